"""Writes a cheap identity of the installed TensorFlow (location + install time).

The Makefile regenerates its cached TensorFlow flags when this changes, without
importing TensorFlow.  The file is rewritten only when the identity changes,
so its timestamp is a usable make prerequisite.

The CUDA choice (``WITH_CUDA`` and where ``NVCC`` is found) is part of the
identity too.

Usage: ``python ops/tf_id.py OUTPUT NVCC``.
"""

import importlib.util
import os
import shutil
import sys


def main():
    output, nvcc = sys.argv[1], sys.argv[2]
    try:
        spec = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        ident = "tensorflow: not installed"
    else:
        ident = f"{sys.executable}\n{spec.origin}\n{os.stat(spec.origin).st_mtime_ns}"
    ident += f"\nWITH_CUDA={os.environ.get('WITH_CUDA', '')}\nnvcc={shutil.which(nvcc)}"
    old = None
    if os.path.exists(output):
        with open(output, encoding="utf-8") as f:
            old = f.read()
    if old != ident:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            f.write(ident)


if __name__ == "__main__":
    main()
