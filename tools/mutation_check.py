"""Mutation check: does the test suite catch deliberately planted bugs?

For every entry of :data:`MUTATIONS` this script

1. copies the repository into a temporary directory (the files git knows of,
   tracked or untracked-but-not-ignored, as they are in the working tree,
   plus the build products listed in :data:`BUILD_PRODUCTS`, so that a rebuild
   is incremental; without git, the whole tree minus caches);
2. applies exactly that one mutation: the ``old`` snippet must occur exactly
   once in ``file``, otherwise the entry fails loudly (the table is out of date);
3. rebuilds the compiled op in the copy when ``needs_rebuild``
   (``make build-ops PYTHON=<this python>``);
4. runs the entry's tests there with ``<this python> -m pytest -x``;
5. records whether the tests CAUGHT the mutation (pytest exit status 1, or
   killed by a signal) or MISSED it (exit status 0).  Anything else (the build
   failed, no test was collected, a usage error, a timeout, or the selected
   tests already fail without the mutation) is an ERROR.

First, unless ``--nobaseline``, each distinct test selection is run once on an
unmutated copy: a selection that fails there cannot judge a mutation.

The results are printed as a table and written as JSON (``--output``, default
``runs/mutation_check.json`` under the repository root).  The exit status is
1 when any mutation was MISSED or ended in an ERROR, else 0.

It is slow (a copy, maybe a rebuild and a test run per mutation), so it is not
part of ``make test``.  Run it from anywhere::

    python tools/mutation_check.py                     # every mutation
    python tools/mutation_check.py --only=cpu_backward_batch_split --keep

``WITH_CUDA=0`` in the environment skips the CUDA kernels in the rebuilds
(then every CPU object is rebuilt once, since the build identity changes).

Table format
------------
:data:`MUTATIONS` is a list of :class:`Mutation` entries, run in order::

    Mutation(
        name="short_unique_name",          # for --only and the report
        file="ops/resample_cpu.h",         # relative to the repository root
        old="exact text to replace",       # must occur exactly once in file
        new="the wrong text",
        tests=("tests/test_resample.py",), # pytest paths or node ids
        keyword="several_threads",         # optional -k expression ("" = none)
        needs_rebuild=True,                # the file is compiled into the op
        bug="what this mutation stands for",
    )

Keep ``old`` short but unique (a line or two, indentation included), and
select the tests that are meant to catch the bug.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ignored build outputs copied along so that `make build-ops` only recompiles
# what a mutation touched.
BUILD_PRODUCTS = ("dirnet_tf/_resample_ops.so", "ops/build")
# Left out of the copy when the repository is not a git checkout.
COPY_IGNORE = (".git", "__pycache__", ".pytest_cache", "runs", "logs", "exports", "datasets",
               "*.egg-info", "*.pyc")

CAUGHT, MISSED, ERROR = "CAUGHT", "MISSED", "ERROR"


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One planted bug: replace ``old`` by ``new`` in ``file``, run ``tests``.

    Attributes
    ----------
    name : str
        Short unique name (``--only`` selects by it).
    file : str
        Path of the mutated file, relative to the repository root.
    old : str
        Snippet to replace; it must occur exactly once in ``file``.
    new : str
        Its replacement.
    tests : tuple of str
        Pytest paths or node ids, relative to the repository root.
    keyword : str
        ``-k`` expression applied to ``tests`` ("" for none).
    needs_rebuild : bool
        Rebuild the compiled op after mutating (``make build-ops``).
    bug : str
        One line on the real bug this mutation stands for.
    """

    name: str
    file: str
    old: str
    new: str
    tests: tuple
    keyword: str = ""
    needs_rebuild: bool = False
    bug: str = ""

    def pytest_selection(self):
        """The pytest arguments that select this mutation's tests."""
        return list(self.tests) + (["-k", self.keyword] if self.keyword else [])


MUTATIONS = [
    Mutation(
        name="cpu_backward_batch_split",
        file="ops/resample_cpu.h",
        old=("      const int64_t b0 = s.batch * first / units;\n"
             "      const int64_t b1 = s.batch * last / units;\n"),
        new=("      const int64_t b0 = first * (s.batch / units);\n"
             "      const int64_t b1 = last * (s.batch / units);\n"),
        tests=("tests/test_resample.py",),
        keyword="several_threads",
        needs_rebuild=True,
        bug="CPU backward with image gradient, whole batch items per work unit: the batch "
            "range of a unit rounds B / units down, so with B % units != 0 the last items "
            "are never computed (uninitialised gradients)",
    ),
    Mutation(
        name="border_left_cell_at_last_line",
        file="ops/resample_core.h",
        old="    const T f = floor_of(xc);\n    const I i = static_cast<I>(f);  // in [0, n-1]\n",
        new=("    const T f = (xc < last || last < T(1)) ? floor_of(xc) : last - T(1);\n"
             "    const I i = static_cast<I>(f);  // in [0, n-1]\n"),
        tests=("tests/test_resample.py",),
        keyword="border_value_and_gradients_at_the_edges",
        needs_rebuild=True,
        bug="border mode at x = n-1 uses the cell [n-2, n-1] (same values, but the coordinate "
            "gradient is the left slope instead of the contract's 0)",
    ),
    Mutation(
        name="border_derivative_open_interval",
        file="ops/resample_core.h",
        old="    const T inside = (x >= T(0) && x <= last) ? T(1) : T(0);\n",
        new="    const T inside = (x > T(0) && x < last) ? T(1) : T(0);\n",
        tests=("tests/test_resample.py",),
        keyword="border_value_and_gradients_at_the_edges",
        needs_rebuild=True,
        bug="border mode treats the edges 0 and n-1 as outside: coordinate gradient 0 at x = 0",
    ),
    Mutation(
        name="best_checkpoint_comparison_inverted",
        file="dirnet_tf/trainer.py",
        old='        improved = metrics.get(self.selection_metric, -np.inf) > self.best_ncc\n',
        new='        improved = metrics.get(self.selection_metric, -np.inf) < self.best_ncc\n',
        tests=("tests/test_trainer.py",),
        keyword="best_validation",
        bug="the 'improved' test of validation is inverted: no best checkpoint is ever written, "
            "so the last checkpoint is exported",
    ),
    Mutation(
        name="best_state_forgotten_on_resume",
        file="dirnet_tf/trainer.py",
        old='            return float(json.load(fh)["validation_ncc"])\n',
        new='            return None\n',
        tests=("tests/test_trainer.py",),
        keyword="best_validation",
        bug="the best validation NCC is not read back on resume: a worse later checkpoint "
            "replaces the best one",
    ),
    Mutation(
        name="export_removes_old_first",
        file="dirnet_tf/inference.py",
        old='        target = os.path.join(tmp, "model")\n',
        new='        shutil.rmtree(export_dir, ignore_errors=True)\n        target = os.path.join(tmp, "model")\n',
        tests=("tests/test_inference.py",),
        bug="the previous export is deleted before the new one is written: a failing second "
            "export destroys the first",
    ),
    Mutation(
        name="folding_fraction_strict_inequality",
        file="dirnet_tf/metrics.py",
        old="    return float((det <= 0).mean())",
        new="    return float((det < 0).mean())",
        tests=("tests/test_metrics.py::test_folding_counts_det_exactly_zero",),
        bug="pixels with det J exactly 0 (collapsed, not invertible) are not counted as folding",
    ),
    Mutation(
        name="contour_metrics_hd95_in_pixels",
        file="dirnet_tf/evaluation.py",
        old='                values[f"hd95_mm_{when}"][i] = metrics.hd95(fixed, mask, spacing)',
        new='                values[f"hd95_mm_{when}"][i] = metrics.hd95(fixed, mask)',
        tests=("tests/test_cardiac_experiment.py::test_contour_metrics_hd95_mad_in_mm_with_anisotropic_spacing",),
        bug="cardiac HD95 reported in pixels but labelled mm (spacing not passed)",
    ),
    Mutation(
        name="register_rgb_grey_channel_mean",
        file="dirnet_tf/register_engine.py",
        old="            array = readers.rgb_to_grey(array)[..., None].astype(np.float32)",
        new="            array = array[..., :3].mean(axis=-1, keepdims=True).astype(np.float32)",
        tests=("tests/test_register_engine.py::test_rgb_input_is_converted_to_luma_grey",),
        bug="RGB input turned grey by the channel mean instead of ITU-R 601 luma (PNG, .npy and "
            "the readers disagree)",
    ),
    Mutation(
        name="mnist_labels_upper_bound_unchecked",
        file="data/mnist.py",
        old="    bad = labels[(labels < 0) | (labels > 9)]",
        new="    bad = labels[labels < 0]",
        tests=("tests/test_mnist_data.py::test_idx_labels_outside_0_9_name_the_labels_file",
               "tests/test_mnist_data.py::test_npz_and_pickle_labels_outside_0_9_name_the_file"),
        bug="MNIST labels above 9 accepted silently",
    ),
    Mutation(
        name="lncc_similarity_is_global_ncc",
        file="dirnet_tf/losses.py",
        old='SIMILARITIES = {"ncc": ncc_loss, "lncc": local_ncc_loss, "mse": mse_loss, "mi": mi_loss}',
        new='SIMILARITIES = {"ncc": ncc_loss, "lncc": ncc_loss, "mse": mse_loss, "mi": mi_loss}',
        tests=("tests/test_training.py::test_similarity_lncc_flag_reaches_local_ncc",),
        bug="--similarity=lncc trains with the global NCC loss",
    ),
    Mutation(
        name="register_npy_output_clipped",
        file="dirnet_tf/register_outputs.py",
        old="        np.save(path, image.astype(np.float32))",
        new="        np.save(path, np.clip(image, 0.0, 1.0).astype(np.float32))",
        tests=("tests/test_register.py::test_npy_output_is_the_models_warped_image",),
        bug="the .npy output of experiments.register is clipped to [0, 1]",
    ),
    Mutation(
        name="mean_displacement_is_length_of_mean",
        file="dirnet_tf/evaluation.py",
        old="    length = np.linalg.norm(disp, axis=-1)\n",
        new="    length = np.linalg.norm(disp.mean(axis=tuple(range(1, disp.ndim - 1)), keepdims=True), axis=-1)\n",
        tests=("tests/test_evaluation.py::test_displacement_length_is_the_mean_length_not_the_length_of_the_mean",),
        bug="evaluation reports the length of the mean signed displacement instead of the mean length",
    ),
    Mutation(
        name="endpoint_error_against_minus_true",
        file="dirnet_tf/synthetic.py",
        old="    error = np.linalg.norm((predicted - true) * np.asarray(spacing, np.float64), axis=-1)\n",
        new="    error = np.linalg.norm((predicted + true) * np.asarray(spacing, np.float64), axis=-1)\n",
        tests=("tests/test_synthetic.py::test_endpoint_error_against_a_nonzero_true_field_by_hand",),
        bug="synthetic.endpoint_error compares the recovered field against -true",
    ),
    Mutation(
        name="nifti_qform_instead_of_sform",
        file="dirnet_tf/readers.py",
        old="    affine = nifti_affine(img.header)\n",
        new="    affine = np.asarray(img.header.get_qform(), dtype=float)\n",
        tests=("tests/test_readers.py::test_nifti_sform_wins_when_its_code_is_set",),
        bug="NIfTI read through the qform instead of the sform (most test files have sform = qform)",
    ),
]


class MutationError(ValueError):
    """A mutation cannot be applied (its snippet is not found exactly once)."""


def apply_mutation(text, old, new, where="the file"):
    """Returns ``text`` with the single occurrence of ``old`` replaced by ``new``.

    Parameters
    ----------
    text : str
        Original file content.
    old, new : str
        Snippet and replacement.
    where : str
        Name of the file, for the error message.

    Raises
    ------
    MutationError
        If ``old`` is empty or does not occur exactly once.
    """
    if not old:
        raise MutationError(f"empty snippet to replace in {where}")
    count = text.count(old)
    if count != 1:
        raise MutationError(
            f"the snippet to replace occurs {count} times in {where} (must be exactly once); "
            f"the mutation table is out of date. Snippet:\n{old}")
    return text.replace(old, new)


def apply_to_tree(root, mutation):
    """Applies ``mutation`` to the file under ``root`` (in place)."""
    path = os.path.join(root, mutation.file)
    if not os.path.isfile(path):
        raise MutationError(f"{mutation.name}: {mutation.file} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    mutated = apply_mutation(text, mutation.old, mutation.new, where=mutation.file)
    with open(path, "w", encoding="utf-8") as f:
        f.write(mutated)


def outcome_from_returncode(returncode):
    """CAUGHT / MISSED / ERROR from the exit status of a pytest run.

    Pytest exits with 0 when all selected tests passed (the mutation was
    MISSED), 1 when some failed (CAUGHT); a negative status means the run was
    killed by a signal, e.g. a segfault in the mutated op (CAUGHT: the suite
    fails too).  2 (interrupted, collection errors), 3 (internal error),
    4 (usage error), 5 (no tests collected) and anything else say nothing
    about the mutation (ERROR).
    """
    if returncode == 0:
        return MISSED
    if returncode == 1 or returncode < 0:
        return CAUGHT
    return ERROR


def validate_table(mutations):
    """Raises ValueError if names are not unique or an entry is incomplete."""
    names = [m.name for m in mutations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate mutation names: {duplicates}")
    for m in mutations:
        if not (m.name and m.file and m.old and m.tests):
            raise ValueError(f"mutation {m.name!r} needs a name, file, old snippet and tests")
        if isinstance(m.tests, str):
            raise ValueError(f"mutation {m.name!r}: tests must be a tuple of paths, not a string")


def select(mutations, only):
    """The entries named in ``only`` (all when empty); unknown names raise ValueError."""
    if not only:
        return list(mutations)
    known = {m.name for m in mutations}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown mutation names {unknown}; known: {sorted(known)}")
    return [m for m in mutations if m.name in only]


def _repository_files(root):
    """Files of the working tree git knows of (tracked or untracked, not ignored), or None."""
    try:
        proc = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    names = sorted({n for n in proc.stdout.decode().split("\0") if n})
    return [n for n in names if os.path.isfile(os.path.join(root, n))]


def copy_repository(root, target):
    """Copies the repository at ``root`` to ``target`` (modification times kept)."""
    files = _repository_files(root)
    if files is None:
        shutil.copytree(root, target, symlinks=True, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    else:
        for name in files:
            dst = os.path.join(target, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(root, name), dst)
    for product in BUILD_PRODUCTS:
        src, dst = os.path.join(root, product), os.path.join(target, product)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)


def _environment(copy_root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (copy_root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def check_imports_copy(copy_root):
    """Raises RuntimeError unless ``import dirnet_tf`` in the copy finds the copy's package."""
    code = "import importlib.util; print(importlib.util.find_spec('dirnet_tf').origin)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy_root, env=_environment(copy_root),
                          capture_output=True, text=True, check=True)
    origin = os.path.realpath(proc.stdout.strip())
    if not origin.startswith(os.path.realpath(copy_root) + os.sep):
        raise RuntimeError(f"in the copy {copy_root}, dirnet_tf is imported from {origin}")


def _run(command, cwd, timeout):
    """Runs ``command``; returns (exit status or None on timeout, output tail, seconds)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=cwd, env=_environment(cwd), capture_output=True,
                              text=True, timeout=timeout)
        status, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = None
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (exc.stdout, exc.stderr)) + f"\n[timed out after {timeout} s]"
    return status, output[-6000:], round(time.monotonic() - start, 1)


def pytest_command(selection):
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]


def build_command(copy_root):
    return ["make", "-C", copy_root, "build-ops", f"PYTHON={sys.executable}"]


def run_mutation(mutation, workdir, timeout, keep, baseline):
    """Copies, mutates, rebuilds if needed and tests; returns a result dict."""
    result = {"name": mutation.name, "file": mutation.file, "bug": mutation.bug,
              "tests": mutation.pytest_selection(), "needs_rebuild": mutation.needs_rebuild,
              "outcome": ERROR, "detail": "", "build_seconds": 0.0, "test_seconds": 0.0,
              "pytest_status": None, "copy": None, "log_tail": ""}
    copy_root = tempfile.mkdtemp(prefix=f"{mutation.name}.", dir=workdir)
    try:
        if baseline is not None and baseline["status"] != 0:
            result["detail"] = (f"the selected tests fail without the mutation "
                                f"(pytest exit status {baseline['status']})")
            result["log_tail"] = baseline["log_tail"]
            return result
        copy_repository(REPO_ROOT, copy_root)
        apply_to_tree(copy_root, mutation)
        check_imports_copy(copy_root)
        if mutation.needs_rebuild:
            status, log, seconds = _run(build_command(copy_root), copy_root, timeout)
            result["build_seconds"] = seconds
            if status != 0:
                result["detail"] = f"the build failed (exit status {status})"
                result["log_tail"] = log
                return result
        status, log, seconds = _run(pytest_command(mutation.pytest_selection()), copy_root, timeout)
        result.update(pytest_status=status, test_seconds=seconds, log_tail=log)
        if status is None:
            result["detail"] = f"the tests timed out after {timeout} s"
            return result
        result["outcome"] = outcome_from_returncode(status)
        result["detail"] = {CAUGHT: "the tests failed", MISSED: "all selected tests passed",
                            ERROR: f"pytest exit status {status}"}[result["outcome"]]
        return result
    except (MutationError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        result["detail"] = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        if keep:
            result["copy"] = copy_root
        else:
            shutil.rmtree(copy_root, ignore_errors=True)


def run_baselines(mutations, workdir, timeout):
    """Runs each distinct selection once on an unmutated copy; maps selection -> result."""
    copy_root = tempfile.mkdtemp(prefix="baseline.", dir=workdir)
    try:
        copy_repository(REPO_ROOT, copy_root)
        check_imports_copy(copy_root)
        results = {}
        for m in mutations:
            key = tuple(m.pytest_selection())
            if key not in results:
                status, log, seconds = _run(pytest_command(list(key)), copy_root, timeout)
                print(f"baseline {' '.join(key)}: exit status {status} ({seconds} s)", flush=True)
                results[key] = {"status": status, "log_tail": log, "seconds": seconds}
        return results
    finally:
        shutil.rmtree(copy_root, ignore_errors=True)


def format_table(results):
    """The results as a fixed-width text table."""
    header = ("mutation", "outcome", "pytest", "build s", "test s", "detail")
    rows = [(r["name"], r["outcome"], str(r["pytest_status"]), str(r["build_seconds"]),
             str(r["test_seconds"]), r["detail"]) for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header) - 1)]
    lines = []
    for row in [header] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if row is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _define_flags():
    # Defined only when run as a script, so that importing the module (its unit
    # test) registers no global absl flags.
    flags.DEFINE_list("only", [], "Comma-separated mutation names to run (default: all).")
    flags.DEFINE_bool("keep", False, "Keep the temporary copies (their paths are reported).")
    flags.DEFINE_string("output", os.path.join("runs", "mutation_check.json"),
                        "JSON report; a relative path is taken from the repository root.")
    flags.DEFINE_bool("baseline", True, "First check that each test selection passes unmutated.")
    flags.DEFINE_integer("timeout", 1800, "Seconds allowed for each build and each test run.")


def main(argv):
    del argv
    options = flags.FLAGS
    validate_table(MUTATIONS)
    try:
        mutations = select(MUTATIONS, options.only)
    except ValueError as exc:
        raise app.UsageError(str(exc)) from exc
    workdir = tempfile.mkdtemp(prefix="mutation_check.")
    try:
        baselines = run_baselines(mutations, workdir, options.timeout) if options.baseline else {}
        results = []
        for m in mutations:
            print(f"== {m.name}: {m.file}", flush=True)
            result = run_mutation(m, workdir, options.timeout, options.keep,
                                  baselines.get(tuple(m.pytest_selection())))
            print(f"   {result['outcome']}: {result['detail']}", flush=True)
            results.append(result)
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(format_table(results))
    output = options.output if os.path.isabs(options.output) else os.path.join(REPO_ROOT,
                                                                                options.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    report = {
        "python": sys.executable,
        "baseline_checked": bool(options.baseline),
        "results": results,
        "caught": [r["name"] for r in results if r["outcome"] == CAUGHT],
        "missed": [r["name"] for r in results if r["outcome"] == MISSED],
        "errors": [r["name"] for r in results if r["outcome"] == ERROR],
    }
    with open(output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"\nReport written to {output}")
    return 0 if not report["missed"] and not report["errors"] else 1


if __name__ == "__main__":
    _define_flags()
    app.run(main)
