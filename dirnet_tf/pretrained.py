"""Models shipped inside the package, loaded by name: ``dirnet_tf.load_model("brain")``.

Each is an export of one of the training commands (the same SavedModel and ``assets/dirnet.json``
metadata as ``--export_dir`` writes) in ``dirnet_tf/models/<name>``, with a ``README.md`` that
says how it was trained, on what data (with licences) and how well it registers.  Nothing is
downloaded: the weights come with the package, so the models work offline.

* ``brain`` -- the contrast-agnostic 3-D brain MRI model of ``python -m experiments.synthbrain``
  (trained from label maps only; affine + bounded symmetric B-spline stages, world space on a
  96x112x96 RAS grid of 2 mm).  ``dirnet_tf/models/brain/README.md``.
"""

import os

__all__ = ["PRETRAINED", "MODELS_DIR", "resolve"]

#: Folder of the shipped models.
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
#: Shipped model name -> what it is (for messages and listings).
PRETRAINED = {"brain": "3-D brain MRI of any contrast (python -m experiments.synthbrain)"}


def _is_export(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb"))


def resolve(path):
    """The export directory that ``path`` names: ``path`` itself when it holds a SavedModel, else the
    shipped model of that name; any other ``path`` is returned unchanged, except a plain word
    (no folder separator, nothing of that name on disk), which raises.

    Raises
    ------
    dirnet_tf.register_errors.RegisterError
        ``path`` looks like a model name but no shipped model has it (the message lists the names),
        or the named model is missing from this installation.
    """
    from dirnet_tf.register_errors import RegisterError

    if _is_export(path) or path in ("", ".", ".."):
        return path
    if path in PRETRAINED:
        shipped = os.path.join(MODELS_DIR, path)
        if not _is_export(shipped):
            raise RegisterError(f"the shipped model {path!r} is missing from this installation ({shipped} holds "
                                "no saved_model.pb); reinstall dirnet-tf with its package data")
        return shipped
    if not os.path.exists(path) and os.sep not in path and (os.altsep is None or os.altsep not in path):
        names = ", ".join(f"{name!r} ({what})" for name, what in PRETRAINED.items())
        raise RegisterError(f"unknown model {path!r}: give an export directory (a folder with saved_model.pb) "
                            f"or the name of a shipped model: {names}")
    return path
