"""Files: written atomically (a reader never sees a half-written file), data files found inside
installed packages, and paths that mean the same on another machine.

* :func:`atomic_write` -- the one atomic writer: ``write(tmp)`` on a temporary name beside the
  target (keeping its extension, from which ITK, nibabel and numpy choose the format), then
  ``os.replace``; the temporary file is removed on any failure.
* :func:`write_json` -- JSON through :func:`atomic_write`.
* :func:`package_file` -- a data file inside an installed package, found without importing it.
* :func:`package_version`, :func:`portable_path` -- how results files record such files.
"""

import importlib.metadata
import importlib.util
import json
import os
import uuid

__all__ = ["atomic_write", "temporary_name", "split_extension", "file_extension", "write_json", "package_file",
           "package_version", "portable_path"]

# Extensions of two parts that name one format (``os.path.splitext`` would split them).
_DOUBLE_EXTENSIONS = (".nii.gz", ".tar.gz", ".pkl.gz")


def split_extension(path):
    """``(name without extension, extension)`` of ``path``'s base name; ``.nii.gz`` counts as one."""
    base = os.path.basename(os.fspath(path))
    lower = base.lower()
    for ext in _DOUBLE_EXTENSIONS:
        if lower.endswith(ext):
            return base[: -len(ext)], base[-len(ext):]
    stem, ext = os.path.splitext(base)
    return stem, ext


def file_extension(path, allowed, what):
    """The (lower-case) extension of ``path`` among ``allowed`` (longest first), else ValueError.

    ``what`` names the file in the message, e.g. ``"an ITK transform file"``.
    """
    name = os.fspath(path).lower()
    for ext in sorted(allowed, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise ValueError(f"{os.fspath(path)}: {what} must end with one of {', '.join(allowed)}")


def temporary_name(path):
    """A fresh temporary file name in ``path``'s directory that keeps ``path``'s extension."""
    path = os.path.abspath(os.fspath(path))
    stem, ext = split_extension(path)
    return os.path.join(os.path.dirname(path), f".{stem}.{uuid.uuid4().hex[:12]}.tmp{ext}")


def atomic_write(path, write):
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``.

    The directory of ``path`` is created.  The temporary name keeps ``path``'s extension
    (see :func:`temporary_name`).  If ``write`` raises, or writes nothing, no file is left
    behind and ``path`` is untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    write : callable
        ``tmp -> anything``: writes the whole file to ``tmp``.

    Returns
    -------
    str
        ``path``.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if not os.path.exists(tmp):
            raise OSError(f"{path}: nothing was written")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`atomic_write`).

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

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)

    return atomic_write(path, write)


def _package_folders(package):
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return [os.path.abspath(folder) for folder in spec.submodule_search_locations]


def package_version(package):
    """The installed version of ``package`` (its distribution of the same name), ``"?"`` if unknown."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def package_file(package, relative, install_hint=None):
    """Path of the data file ``relative`` (``/``-separated) inside the installed ``package``.

    The package is located with ``importlib.util.find_spec`` and never imported.

    Parameters
    ----------
    package : str
        Import name of the package (e.g. ``"nilearn"``).
    relative : str
        Path inside the package, e.g. ``"datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"``.
    install_hint : str or None
        What to do when it is missing (appended to the message).

    Raises
    ------
    FileNotFoundError
        The package is not installed or lacks the file; the message names both.
    """
    hint = f"; {install_hint}" if install_hint else ""
    folders = _package_folders(package)
    if folders is None:
        raise FileNotFoundError(f"the Python package {package} is not installed{hint}")
    for folder in folders:
        path = os.path.join(folder, *relative.split("/"))
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the installed package {package} {package_version(package)} has no {relative} "
                            f"(looked in {', '.join(folders)}){hint}")


def portable_path(path, packages=()):
    """``path`` as a results file records it.

    A file inside one of the installed ``packages`` becomes ``package:version/inside`` (e.g.
    ``pydicom:3.0.2/data/test_files/examples_ybr_color.dcm``), a file below the working
    directory a relative path, anything else its absolute path.  The packages are located
    without being imported.
    """
    path = os.path.abspath(os.fspath(path))
    for package in packages:
        for folder in _package_folders(package) or []:
            if path.startswith(folder + os.sep):
                return f"{package}:{package_version(package)}/{os.path.relpath(path, folder).replace(os.sep, '/')}"
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
