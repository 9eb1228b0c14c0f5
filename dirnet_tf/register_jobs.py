"""Registration jobs: one pair of images and the output files asked for it, and ``--pairs`` CSV files.

A :class:`Job` names the fixed and moving image files, optional inputs (moving labels, fixed
points) and outputs (file paths or None) with the names of ``experiments.register``'s flags.
:func:`read_pairs` reads a CSV of jobs (paths relative to the CSV's folder), :func:`check_jobs`
checks what can be checked before any image is read (missing names, output types, clashes).
"""

import csv
import dataclasses
import os

from dirnet_tf.register_errors import RegisterError
from dirnet_tf.register_outputs import OUTPUT_EXTENSIONS, check_writable, elastix_paths, output_extension

__all__ = ["INPUTS", "OUTPUTS", "PAIR_COLUMNS", "Job", "read_pairs", "check_jobs", "wanted_outputs"]

#: Per-pair input and output names (flags and --pairs columns).
INPUTS = ("fixed", "moving", "moving_labels", "points")
OUTPUTS = ("out", "displacement", "out_labels", "out_points", "transform", "elastix_transform", "figure")
PAIR_COLUMNS = INPUTS + OUTPUTS


@dataclasses.dataclass
class Job:
    """One pair and its outputs (file paths or None); ``where`` names it in messages."""

    fixed: str
    moving: str
    moving_labels: str = None
    points: str = None
    out: str = None
    displacement: str = None
    out_labels: str = None
    out_points: str = None
    transform: str = None
    elastix_transform: str = None
    figure: str = None
    where: str = ""

    def outputs(self):
        """``{flag: path}`` of the outputs asked for."""
        return {name: getattr(self, name) for name in OUTPUTS if getattr(self, name)}


def read_pairs(path):
    """Jobs of a ``--pairs`` CSV: columns ``fixed,moving`` and optional columns named like the flags
    (paths relative to the CSV's folder)."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise RegisterError(f"cannot read --pairs={path}: {exc}") from exc
    if "fixed" not in columns or "moving" not in columns:
        raise RegisterError(f"--pairs={path}: the header row needs `fixed` and `moving` columns; found "
                            f"{list(columns)}")
    unknown = sorted(set(columns) - set(PAIR_COLUMNS) - {""})
    if unknown:
        raise RegisterError(f"--pairs={path}: unknown column(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(PAIR_COLUMNS)}")
    jobs = []
    for line, row in enumerate(rows, start=2):
        values = {name: (row.get(columns[name]) or "").strip() for name in PAIR_COLUMNS if name in columns}
        if not any(values.values()):
            continue
        resolved = {k: (v if os.path.isabs(v) else os.path.join(base, v)) if v else None for k, v in values.items()}
        jobs.append(Job(**resolved, where=f"{path}, line {line}"))
    if not jobs:
        raise RegisterError(f"--pairs={path} lists no pairs")
    return jobs


def check_jobs(jobs, model=None):
    """Fail early on what can be checked before reading images: missing names, output types, clashes.

    ``model`` (a :class:`dirnet_tf.registration.ExportedModel`, when loaded) tells how many
    elastix files a chain has.
    """
    steps = model.steps if model is not None else None
    seen = {}
    for job in jobs:
        where = f" ({job.where})" if job.where else ""
        for name in ("fixed", "moving"):
            if getattr(job, name) is None or (isinstance(getattr(job, name), str) and not getattr(job, name)):
                raise RegisterError(f"no {name} image{where}")
        for a, b in (("moving_labels", "out_labels"), ("points", "out_points")):
            if bool(getattr(job, a)) != bool(getattr(job, b)):
                given, missing = (a, b) if getattr(job, a) else (b, a)
                raise RegisterError(f"--{given} needs --{missing}{where}")
        outputs = job.outputs()
        if not outputs:
            raise RegisterError(f"nothing to write{where}: give --out or another output")
        for name, path in outputs.items():
            output_extension(path, OUTPUT_EXTENSIONS[name], name)
            check_writable(path, name)
            targets = [path]
            if name == "elastix_transform":
                targets = elastix_paths(path, len(steps or [None]), True, single=steps is None)
            for target in targets:
                key = os.path.abspath(target)
                if key in seen:
                    raise RegisterError(f"--{name}={path}{where} is also written as --{seen[key]}; "
                                        "give every output its own file")
                seen[key] = name


def wanted_outputs(job):
    """What :func:`dirnet_tf.register_engine.finish` must compute for ``job``'s outputs."""
    want = set()
    if job.out:
        want.add("image")
    if job.displacement:
        want.add("field" if job.displacement.lower().endswith(".npy") else "field_fixed")
    if job.out_labels:
        want.add("labels")
    if job.out_points:
        want.add("points")
    return want
