"""The error of the registration API and command: bad input, named in the message.

:class:`RegisterError` is raised by :mod:`dirnet_tf.registration` and its engine modules for a
user mistake (an unreadable file, a 2-D image for a 3-D model, labels not on the moving image's
grid, points outside the fixed image, an unwritable output).  Its message names the file or the
flag (``--out=...``) and says what to do; ``python -m experiments.register`` prints it as
``error: ...`` and exits with status 1.
"""

__all__ = ["RegisterError"]


class RegisterError(ValueError):
    """Bad input to a registration; the message names the file."""
