"""A quiet console: TensorFlow's start-up noise hidden from the commands' output.

TensorFlow prints lines at start-up that alarm a newcomer but mean nothing is wrong: on a machine
without a GPU the error-level ``failed call to cuInit: ... UNKNOWN ERROR (303)``, and on every
machine ``oneDNN custom operations are on``, ``Could not find cuda drivers``, ``This TensorFlow
binary is optimized to use available CPU instructions``, plus Python-side deprecation warnings
raised inside TensorFlow and Keras.

:func:`quiet_tensorflow` must be called *before* ``import tensorflow`` (it never imports it): the
C++ log level is read once, when the library loads.  :func:`import_tensorflow_quietly` also hides
the few C++ lines that TensorFlow writes before its log level applies (``I0000 ... port.cc``,
``cudart_stub.cc``, ``WARNING: All log messages before absl::InitializeLog() ...``); every other
line it writes is passed on.  Neither changes anything the user set.  :func:`quiet_tensorflow_logs`
hides TensorFlow's info lines around a save (``Sharding callback duration``, ``Assets written to``,
...), leaving the loggers as they were.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

__all__ = ["quiet_tensorflow", "import_tensorflow_quietly", "quiet_tensorflow_logs", "STARTUP_NOISE"]

# Third-party packages whose own deprecation warnings are hidden (they are not ours to fix).
_NOISY_PACKAGES = r"(tensorflow|tf_keras|keras|absl|h5py|google\.protobuf|flatbuffers|ml_dtypes)(\..*)?$"

#: Regular expressions of the harmless C++ lines TensorFlow writes while it is imported.
STARTUP_NOISE = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"[IW]\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on",
    r"[IW]\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers",
    r"[IW]\d{4} [\d:. ]+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.",
)


def _has_nvidia_driver():
    """Whether an NVIDIA driver is loaded (Linux: ``/proc/driver/nvidia``); True where unknown."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.isdir("/proc/driver/nvidia")


def quiet_tensorflow(level=None):
    """Hide TensorFlow's start-up log lines and third-party deprecation warnings.

    Call it before ``import tensorflow`` (it does not import TensorFlow, so it is cheap).

    * ``TF_CPP_MIN_LOG_LEVEL`` (TensorFlow's C++ log level), unless the user set it: ``level``,
      by default ``"3"`` on a machine without an NVIDIA driver (its only error line, ``failed
      call to cuInit``, says just that there is no GPU) and ``"2"`` elsewhere (info and warnings
      hidden, errors kept: on a GPU machine a C++ error matters);
    * the Python loggers ``tensorflow`` and ``absl`` show errors only (e.g. retracing or
      SavedModel notices);
    * ``DeprecationWarning``, ``PendingDeprecationWarning`` and ``FutureWarning`` raised inside
      TensorFlow, Keras, absl, h5py or protobuf are ignored; warnings of ``dirnet_tf`` and of
      the user's code stay visible.

    Parameters
    ----------
    level : int or str or None
        The C++ log level to use where the user set none (0 all ... 3 fatal only); None: see above.

    Returns
    -------
    str
        The ``TF_CPP_MIN_LOG_LEVEL`` now in effect.
    """
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        if level is None:
            level = 2 if _has_nvidia_driver() else 3
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(int(level))
    for name in ("tensorflow", "absl"):
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_PACKAGES)
    return os.environ["TF_CPP_MIN_LOG_LEVEL"]


def import_tensorflow_quietly(level=None):
    """:func:`quiet_tensorflow`, then ``import tensorflow`` without its harmless start-up lines.

    While TensorFlow loads, the process's standard error (file descriptor 2) goes to a
    temporary file; afterwards every line of it that is not one of :data:`STARTUP_NOISE` is
    written to standard error again, so a real problem is still shown.  An exception raised by
    the import propagates unchanged (after the lines were passed on).

    Parameters
    ----------
    level : int or str or None
        As for :func:`quiet_tensorflow`.

    Returns
    -------
    module
        The ``tensorflow`` module.
    """
    quiet_tensorflow(level)
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    noise = re.compile("|".join(f"(?:{p})" for p in STARTUP_NOISE))
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (e.g. a notebook kernel)
        import tensorflow  # noqa: PLC0415

        return tensorflow
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: PLC0415
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if line.strip() and not noise.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
    return tensorflow


# The Python loggers TensorFlow writes its notices to (``tf_logging`` and ``absl.logging``).
_TENSORFLOW_LOGGERS = ("tensorflow", "absl")


class _BelowLevel(logging.Filter):
    """Drops the records below ``level``."""

    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno >= self.level


@contextlib.contextmanager
def quiet_tensorflow_logs(level=logging.ERROR):
    """Hide TensorFlow's Python log records below ``level`` inside the block.

    ``tf.saved_model.save`` and checkpoint saves log at info level (``Sharding callback
    duration: N microseconds``, ``Function `serve` contains input name(s) resource with
    unsupported characters``, ``Assets written to: ...``, ``Writing fingerprint to ...``),
    which an ``absl.app`` program (verbosity info) prints.  Worse, ``tf.saved_model.save``
    sets the absl verbosity to FATAL and back while it lists the objects to save, which
    resets the ``absl`` logger's level to "inherit from the root logger" (info under
    ``absl.app``): from then on every later checkpoint prints its ``Sharding callback``
    line too, even where the program had set that logger to errors only.

    Inside the block a filter on the ``tensorflow`` and ``absl`` loggers drops records below
    ``level`` (a filter survives such resets); on leaving it, the filter is removed and the
    levels of those loggers and of the root logger are set back to what they were.

    Parameters
    ----------
    level : int
        ``logging`` level of the records still shown (default: errors).
    """
    loggers = [logging.getLogger(name) for name in _TENSORFLOW_LOGGERS]
    levels = [(logger, logger.level) for logger in loggers + [logging.getLogger()]]
    below = _BelowLevel(level)
    for logger in loggers:
        logger.addFilter(below)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(below)
        for logger, previous in levels:
            if logger.level != previous:
                logger.setLevel(previous)
