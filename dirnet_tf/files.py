"""Result files: written atomically (a reader never sees a half-written file), with paths that
mean the same on another machine."""

import importlib.metadata
import importlib.util
import json
import os
import uuid

__all__ = ["write_json", "portable_path"]


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary name, then rename).

    Parameters
    ----------
    path : str
        Target file; its directory is created.
    obj : JSON-able (values that are not are written with ``str``).

    Returns
    -------
    str
        ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def portable_path(path, packages=()):
    """``path`` as a results file records it.

    A file inside one of the installed ``packages`` becomes ``package:version/inside`` (e.g.
    ``pydicom:3.0.2/data/test_files/examples_ybr_color.dcm``), a file below the working
    directory a relative path, anything else its absolute path.  The packages are located
    without being imported.
    """
    path = os.path.abspath(os.fspath(path))
    for package in packages:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folder = os.path.abspath(folder)
            if path.startswith(folder + os.sep):
                try:
                    version = importlib.metadata.version(package)
                except importlib.metadata.PackageNotFoundError:
                    version = "?"
                return f"{package}:{version}/{os.path.relpath(path, folder).replace(os.sep, '/')}"
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
