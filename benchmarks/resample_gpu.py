"""GPU timings of the CUDA resampler kernels next to PyTorch's ``grid_sample``.

Runs on a GPU machine that has nvcc and (optionally) PyTorch but no TensorFlow:
it runs the standalone harness built by ``make test-gpu`` (``ops/build/gpu_harness``),
which checks the CUDA kernels against the CPU core and then times
forward+backward (gradients for image and coordinates, and for the coordinates
alone) at the benchmark sizes, and, in the same run, times
``torch.nn.functional.grid_sample`` forward+backward on the same sizes with CUDA
events (median of repeated runs after warm-up).  The harness launches its
kernels from C++; the grid_sample timings include PyTorch's dispatch between
kernels, which dominates at small sizes.
Prints a table and writes JSON::

    make test-gpu && python -m benchmarks.resample_gpu

Only the standard library, numpy and (when installed) torch are imported, so it
runs where TensorFlow is not installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parent.parent / "ops" / "build" / "gpu_harness"

_TIME_LINE = re.compile(
    r"^time\s+(?P<ndim>\d)D B=(?P<batch>\d+) (?P<size>\d+)\^\d C=1 float: "
    r"forward\+backward (?P<ms>[0-9.]+) ms")
# Optional extra timings in the line's parenthesis.
_EXTRA_TIMES = {
    "fwd": re.compile(r"forward alone ([0-9.]+) ms"),
    "coords_only": re.compile(r"coords-only forward\+backward ([0-9.]+) ms"),
}


def parse_harness_output(text: str) -> dict:
    """Reads the harness's report: GPU name, pass/fail and its timing lines.

    Returns ``{"gpu": str or None, "passed": bool, "no_gpu": bool,
    "times": [{"ndim", "batch", "size", "ms"[, "fwd", "coords_only"]}, ...]}``:
    ``ms`` is forward+backward (both gradients), ``fwd`` the forward pass alone and
    ``coords_only`` forward + coordinates-only backward, when the harness reports them.
    """
    gpu = None
    times = []
    for line in text.splitlines():
        if line.startswith("GPU: "):
            gpu = line[len("GPU: "):].strip()
        match = _TIME_LINE.match(line.strip())
        if match:
            entry = {"ndim": int(match["ndim"]), "batch": int(match["batch"]),
                     "size": int(match["size"]), "ms": float(match["ms"])}
            for key, pattern in _EXTRA_TIMES.items():
                extra = pattern.search(line)
                if extra:
                    entry[key] = float(extra.group(1))
            times.append(entry)
    return {"gpu": gpu, "passed": "ALL GPU CHECKS PASSED" in text,
            "no_gpu": text.startswith("NO GPU") or "\nNO GPU" in text, "times": times}


def ij_to_grid(ij, size: int):
    """Absolute ij pixel coordinates -> grid_sample's normalised xy(z) grid.

    With ``align_corners=True``, -1 and 1 are the centres of the first and the
    last pixel, and the last axis of the grid is ordered x (last image axis) first.
    """
    return ij.flip(-1) / (size - 1) * 2 - 1


def time_grid_sample(ndim: int, batch: int, size: int, repeats: int = 20,
                     warmup: int = 5, device: str = "cuda", image_grad: bool = True) -> float:
    """Median ms of grid_sample forward+backward: grid gradient, and the image
    gradient too when ``image_grad``."""
    import time

    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, 1) + (size,) * ndim
    image = torch.rand(shape, device=device, generator=gen).requires_grad_(image_grad)
    # Identity plus up to +-2 px of jitter, as the harness draws.
    axes = torch.meshgrid(*[torch.arange(size, device=device, dtype=torch.float32)] * ndim,
                          indexing="ij")
    ij = torch.stack(axes, dim=-1).expand((batch,) + (size,) * ndim + (ndim,))
    ij = ij + (torch.rand(ij.shape, device=device, generator=gen) * 4 - 2)
    grid = ij_to_grid(ij, size).contiguous().requires_grad_(True)
    grad_out = torch.rand(shape, device=device, generator=gen)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
    times = []
    for rep in range(warmup + repeats):
        image.grad = None
        grid.grad = None
        if on_gpu:
            start.record()
        else:
            t0 = time.perf_counter()
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        out.backward(grad_out)
        if on_gpu:
            stop.record()
            stop.synchronize()
            elapsed = start.elapsed_time(stop)
        else:
            elapsed = (time.perf_counter() - t0) * 1e3
        if rep >= warmup:
            times.append(elapsed)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harness", default=str(HARNESS),
                        help="the harness binary built by `make test-gpu`")
    parser.add_argument("--out", default="runs/bench/bench_resample_gpu.json",
                        help="JSON output path")
    parser.add_argument("--extra_sizes", default="2:32:512,3:2:128",
                        help="comma-separated NDIM:BATCH:SIZE timing cases beyond the three "
                             "benchmark sizes (large enough that kernel time, not launch "
                             "overhead, dominates); empty for none")
    args = parser.parse_args(argv)

    harness = Path(args.harness)
    if not harness.is_file():
        print(f"{harness} does not exist: run `make test-gpu` first (needs nvcc).",
              file=sys.stderr)
        return 2
    extra = [c for c in args.extra_sizes.split(",") if c]
    proc = subprocess.run([str(harness)] + extra, capture_output=True, text=True)
    report = parse_harness_output(proc.stdout)
    if report["no_gpu"]:
        print("No GPU here: nothing to time.", file=sys.stderr)
        return 2
    if proc.returncode == 2:
        print(proc.stderr, file=sys.stderr)
        return 2
    if proc.returncode != 0 or not report["passed"]:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        print("The GPU checks failed: timings are not reported.", file=sys.stderr)
        return 1

    try:
        import torch
        torch_ok = torch.cuda.is_available()
        torch_version = torch.__version__
    except ImportError:
        torch_ok, torch_version = False, None
    rows = []
    for t in report["times"]:
        row = {"ndim": t["ndim"], "batch": t["batch"], "size": t["size"], "ours_ms": t["ms"],
               "ours_coords_only_ms": t.get("coords_only"), "ours_forward_ms": t.get("fwd")}
        for suffix, image_grad in (("", True), ("_coords_only", False)):
            theirs = (time_grid_sample(row["ndim"], row["batch"], row["size"],
                                       image_grad=image_grad) if torch_ok else None)
            ours = row[f"ours{suffix}_ms"]
            row[f"grid_sample{suffix}_ms"] = theirs
            row[f"ratio{suffix}"] = theirs / ours if theirs and ours else None
        rows.append(row)

    print(f"GPU: {report['gpu']}   torch: {torch_version or 'not installed'}")
    print("float32, C=1, median ms. fwd+bwd: image and coordinate gradients; coords-only: "
          "coordinate gradient alone (training a registration network).")
    print(f"{'case':<16}{'fwd+bwd ours':>13}{'grid_sample':>12}{'ratio':>7}"
          f"{'coords-only ours':>17}{'grid_sample':>12}{'ratio':>7}"
          f"{'fwd ours':>10}")

    def cell(value, fmt):
        return format(value, fmt) if value is not None else "-"

    for row in rows:
        case = f"{row['ndim']}D B={row['batch']} {row['size']}^{row['ndim']}"
        print(f"{case:<16}{row['ours_ms']:>13.3f}{cell(row['grid_sample_ms'], '.3f'):>12}"
              f"{cell(row['ratio'], '.2f'):>7}{cell(row['ours_coords_only_ms'], '.3f'):>17}"
              f"{cell(row['grid_sample_coords_only_ms'], '.3f'):>12}"
              f"{cell(row['ratio_coords_only'], '.2f'):>7}"
              f"{cell(row['ours_forward_ms'], '.3f'):>10}")
    print("ratio = grid_sample / ours (above 1: ours is faster).")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"gpu": report["gpu"], "torch": torch_version, "checks_passed": True,
         "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
