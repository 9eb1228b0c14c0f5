"""Writing result files atomically: a reader never sees a half-written file."""

import json
import os
import uuid

__all__ = ["write_json"]


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
