"""The benchmarks' command line: absl flags in a ``FlagValues`` of each script's own.

Each benchmark module defines its flags in its own ``flags.FlagValues`` (so
importing several of them, or an experiment, never clashes on a flag name) and
parses them in ``main(argv)`` with :func:`parse`, so tests can call
``main([...])`` directly.
"""

import sys

from absl import flags


def parse(flag_values, program, argv=None):
    """Parse ``argv`` (the arguments after the program name; default ``sys.argv[1:]``).

    Parameters
    ----------
    flag_values : absl.flags.FlagValues
    program : str
        Named in error messages (``python -m PROGRAM``).
    argv : list of str or None

    Returns
    -------
    list of str or None
        The arguments parsed (for recording the command), or ``None`` after printing
        ``error: ...`` for a bad command line (the caller then exits with status 2).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest = flag_values([program] + argv)
    except flags.Error as exc:
        print(f"error: python -m {program}: {exc}", file=sys.stderr)
        return None
    if len(rest) > 1:
        print(f"error: python -m {program}: unexpected arguments {rest[1:]}", file=sys.stderr)
        return None
    return argv


def parse_sections(text, known):
    """The section names of a comma-separated ``--sections`` value, or ``None`` after printing
    ``error: ...`` naming the unknown ones and the known ones (the caller exits with status 2)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; use {', '.join(known)}", file=sys.stderr)
        return None
    return names


def save_report(path, report):
    """Write ``report`` as indented JSON to ``path`` through a temporary file renamed into place (called
    after every section, so a long run keeps what it has measured); its folder is created."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh, indent=2, default=float)
    os.replace(path + ".tmp", path)
