"""Points CSV files of a registration: read fixed-image points, write the corresponding moving points.

A points file has a header row and one point per row.  Coordinate columns (case-insensitive):

* ``i, j[, k]`` -- **voxel indices of the fixed image, ij order** (any image; the only choice
  for images without patient geometry: PNG, NPY, numpy arrays);
* ``x, y, z`` -- **world RAS+ mm** (NIfTI/DICOM; 2-D images: ``x, y`` in the image plane,
  ``z`` optional).

Other columns are copied unchanged to the output, whose coordinate columns then hold the
corresponding moving-image points in the same kind of coordinates (moving voxel indices ij, or
moving RAS+ mm): the transformix ``-def`` direction.
"""

import csv
import os

import numpy as np

from dirnet_tf.geometry import world_to_voxels
from dirnet_tf.register_errors import RegisterError

__all__ = ["VOXEL_COLUMNS", "WORLD_COLUMNS", "EDGE", "read_points", "write_points", "table_to_fixed_voxels",
           "check_points_inside"]

VOXEL_COLUMNS = ("i", "j", "k")
WORLD_COLUMNS = ("x", "y", "z")
#: Voxels: tolerance of the "inside the fixed image" test of points.
EDGE = 1e-6


def read_points(path, ndim, has_affine):
    """Read a CSV of points: a header row, then one point per row (see the module docstring).

    Parameters
    ----------
    path : str
    ndim : int
        Spatial axes of the fixed image.
    has_affine : bool
        Whether the fixed image has patient geometry (world columns allowed).

    Returns
    -------
    dict
        ``header`` (list of str), ``rows`` (lists of str), ``lines`` (file line
        of each row), ``kind`` (``'voxel'`` or ``'world'``), ``columns``
        (indices of the coordinate columns), ``values`` float64 ``[P, ncols]``, ``path``.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise RegisterError(f"cannot read the points file {path}: {exc}") from exc
    if not table or not any(c.strip() for c in table[0]):
        raise RegisterError(f"points file {path} is empty; it needs a header row naming the coordinate columns")
    header = [c.strip() for c in table[0]]
    lower = [c.lower() for c in header]
    voxel = list(VOXEL_COLUMNS[:ndim])
    world = list(WORLD_COLUMNS[:ndim]) if ndim == 3 else ["x", "y"] + (["z"] if "z" in lower else [])
    has_voxel = all(c in lower for c in voxel)
    has_world = all(c in lower for c in world)
    if has_voxel and has_world:
        raise RegisterError(f"points file {path}: give either voxel columns {','.join(voxel)} or world columns "
                            f"{','.join(world)}, not both")
    if has_world and not has_affine:
        raise RegisterError(f"points file {path}: columns {','.join(world)} are world mm coordinates, but the fixed "
                            "image has no patient geometry (PNG/NPY); give voxel columns "
                            f"{','.join(voxel)} (ij order)")
    if not (has_voxel or has_world):
        raise RegisterError(f"points file {path}: the header {header} names no coordinate columns; expected "
                            f"{','.join(voxel)} (voxels, ij order)"
                            + (f" or {','.join(world)} (RAS+ mm)" if has_affine else ""))
    names = voxel if has_voxel else world
    columns = [lower.index(c) for c in names]
    rows, lines, values = [], [], []
    for line, row in enumerate(table[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            values.append([float(row[c]) for c in columns])
        except (ValueError, IndexError):
            raise RegisterError(f"points file {path}, line {line}: {row} does not hold numbers in columns "
                                f"{','.join(names)}") from None
        if not np.all(np.isfinite(values[-1])):
            raise RegisterError(f"points file {path}, line {line}: non-finite coordinates {row}")
        rows.append(list(row) + [""] * (len(header) - len(row)))
        lines.append(line)
    if not rows:
        raise RegisterError(f"points file {path} holds no points (only a header)")
    return {"header": header, "rows": rows, "lines": lines, "kind": "voxel" if has_voxel else "world",
            "columns": columns, "values": np.asarray(values, dtype=np.float64), "path": os.fspath(path)}


def write_points(path, table, values):
    """Write ``table`` (from :func:`read_points`) with its coordinate columns replaced by ``values``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table["header"])
        for row, point in zip(table["rows"], np.asarray(values, dtype=np.float64)):
            row = list(row)
            for c, v in zip(table["columns"], point):
                row[c] = repr(float(v))
            writer.writerow(row)


def table_to_fixed_voxels(table, image):
    """Points of a :func:`read_points` table -> voxel indices of the fixed ``image`` ``[P, ndim]`` (ij)."""
    if table["kind"] == "voxel":
        return table["values"].copy()
    return world_to_voxels(image.affine, table["values"], image.ndim)


def check_points_inside(points, image, table):
    """RegisterError naming the file and line of the first point (fixed voxels ij) outside ``image``
    (beyond half a voxel past the border voxel centres, :data:`EDGE` tolerance)."""
    shape = np.asarray(image.shape, dtype=np.float64)
    bad = np.any((points < -0.5 - EDGE) | (points > shape - 0.5 + EDGE), axis=1)
    if bad.any():
        n = int(np.argmax(bad))
        row = table["rows"][n]
        raise RegisterError(f"points file {table['path']}, line {table['lines'][n]}: the point "
                            f"{[row[c] for c in table['columns']]} lies outside the fixed image {image.source} "
                            f"(voxel {np.round(points[n], 3).tolist()}, ij order; the image spans -0.5 to "
                            f"{(shape - 0.5).tolist()})")
