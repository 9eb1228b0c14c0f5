"""Former name of :mod:`dirnet_tf.resample_pure_tf` (kept for existing imports)."""

from dirnet_tf.resample_pure_tf import resample_pure_tf as resample_tf  # noqa: F401
