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
