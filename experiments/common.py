"""What every command shares: flags from :class:`dirnet_tf.config.TrainConfig`, and clean errors.

* :func:`define_flags` defines one absl flag per :class:`~dirnet_tf.config.TrainConfig` field of
  the given groups (name, type, default, help and choices from the field); a command adds its own
  with :func:`define_flag` and sets its defaults in :func:`run_experiment`.
* :func:`flags_dict` is the parsed values of every flag defined this way, :func:`config_from_flags`
  the :class:`TrainConfig` of them (a command's own flags go to ``extra``).
* :func:`run_experiment` -- the command-line entry: defaults, parsing, presets, TensorFlow's start-up
  lines hidden, and ``error: ...`` with exit status 1 instead of a traceback for expected failures.

This module imports no TensorFlow: ``--help`` answers before TensorFlow is loaded.
"""

import signal
import sys

from absl import app, flags

from dirnet_tf.config import SHARED_GROUPS, TrainConfig, fields_of
from dirnet_tf.console import import_tensorflow_quietly

# Names of the flags defined through define_flag (what flags_dict returns).
_DEFINED = []


def define_flag(kind, name, default, help_text, *args):
    """Define an absl flag once (command modules share one ``FLAGS``).

    Parameters
    ----------
    kind : str
        ``"integer"``, ``"float"``, ``"string"``, ``"bool"`` or ``"enum"``.
    name, default, help_text
        As for ``absl.flags.DEFINE_*``.
    *args
        The enum values for ``"enum"``.
    """
    if name in flags.FLAGS:
        return
    definer = getattr(flags, "DEFINE_" + kind)
    if args:
        definer(name, default, *args, help_text)
    else:
        definer(name, default, help_text)
    _DEFINED.append(name)


def defined_flags():
    """Names of the flags defined through :func:`define_flag`, in order."""
    return list(_DEFINED)


_KINDS = {int: "integer", float: "float", bool: "bool", str: "string"}


def define_flags(groups=SHARED_GROUPS):
    """Define the flags of the :class:`TrainConfig` fields of ``groups`` (idempotent).

    The default groups are the settings every command has (model, objective, optimisation, run);
    ``experiments.train`` adds data, pairing, split, synthetic and evaluation.
    """
    for group in groups:
        for field in fields_of(group):
            choices = field.metadata["choices"]
            kind = "enum" if choices else _KINDS[field.type]
            define_flag(kind, field.name, field.default, field.metadata["help"], *([list(choices)] if choices else []))


def flags_dict():
    """The parsed values of every flag defined with :func:`define_flag`, as a JSON-able dict."""
    return {name: flags.FLAGS[name].value for name in sorted(_DEFINED)}


def config_from_flags(values=None):
    """The :class:`TrainConfig` of flag values (default: :func:`flags_dict`); a command's own flags
    are kept in ``extra``."""
    return TrainConfig.from_dict(flags_dict() if values is None else values, extra_ok=True)


def apply_preset(presets, name):
    """Set the flags of preset ``name`` that were not given on the command line.

    Parameters
    ----------
    presets : dict
        ``name -> {flag: value}``.
    name : str
        ``""`` for none.
    """
    if not name:
        return
    if name not in presets:
        raise ValueError(f"--preset={name}: choose one of {sorted(presets)}")
    for flag, value in presets[name].items():
        if not flags.FLAGS[flag].present:
            flags.FLAGS[flag].value = value


def run_experiment(run, defaults, errors=(), presets=None):
    """Command-line entry of a command: defaults, flag parsing, clean errors.

    Applies ``defaults`` to the flags, parses the command line with ``absl.app``, hides
    TensorFlow's start-up log lines (:func:`dirnet_tf.console.import_tensorflow_quietly`, unless the user set
    ``TF_CPP_MIN_LOG_LEVEL``) and calls ``run(config_from_flags())``.  Expected failures (missing or
    corrupt data, bad flag values, a diverged run, and ``errors``) print ``error: ...`` and exit
    with status 1 instead of a traceback; Ctrl-C prints one line saying how to resume (status 130).

    Parameters
    ----------
    run : callable
        ``TrainConfig -> anything``.
    defaults : dict
        Flag defaults of this command (``flag_name=value``), applied before parsing.
    errors : tuple of exception types
        Command-specific expected errors.
    presets : dict or None
        ``name -> {flag: value}`` selected by a ``--preset`` flag of the command: applied after
        parsing to the flags not given on the command line.  ``--preset`` is a string flag (commands
        loaded into one process share it); a name not in ``presets`` is an error naming the choices.
    """

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        import_tensorflow_quietly()
        from dirnet_tf.trainer import TrainingDivergedError, TrainingInterrupted

        expected = (FileNotFoundError, ValueError, TrainingDivergedError) + tuple(errors)
        interrupted = []

        def on_interrupt(signum, frame):
            interrupted.append(signum)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            if presets:
                apply_preset(presets, flags.FLAGS["preset"].value)
            run(config_from_flags())
        except BaseException as exc:  # noqa: BLE001 - sorted below; anything unexpected is raised again
            # TensorFlow may turn a KeyboardInterrupt raised while it traces into another exception.
            if interrupted or isinstance(exc, KeyboardInterrupt):
                message = str(exc) if isinstance(exc, TrainingInterrupted) else (
                    "interrupted: run the same command again to resume from the last checkpoint in "
                    f"{flags.FLAGS['logdir'].value}")
                print(message, file=sys.stderr, flush=True)
                return 130
            if isinstance(exc, expected):
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return 1
            raise
        finally:  # a command run inside a longer process leaves its SIGINT handling as it was
            signal.signal(signal.SIGINT, previous)
        return 0

    for name, value in defaults.items():
        flags.FLAGS.set_default(name, value)
    app.run(lambda argv: sys.exit(main(argv)))

