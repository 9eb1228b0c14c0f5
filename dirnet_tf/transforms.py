"""Temporary shim: the old home of the ITK / elastix / point-mapping exports (to be deleted).

Split by concern into :mod:`dirnet_tf.itk` (ITK geometry and transforms),
:mod:`dirnet_tf.field_images` (displacement-field images),
:mod:`dirnet_tf.elastix_params` (elastix parameter files) and
:mod:`dirnet_tf.spline_np` (the numpy spline, point maps in voxels ij).
``map_points`` is now :func:`dirnet_tf.spline_np.map_points_bspline` and
``map_points_steps`` :func:`dirnet_tf.spline_np.map_points_chain`.  Import from
those modules; this one only re-exports their names for callers not yet moved.
"""

from dirnet_tf.elastix_params import (  # noqa: F401 - re-exports
    elastix_affine_parameters,
    elastix_numbers,
    elastix_step_parameters,
    elastix_transform_parameters,
    write_elastix_transform,
)
from dirnet_tf.field_images import displacement_field_image, write_displacement_field  # noqa: F401
from dirnet_tf.files import file_extension  # noqa: F401
from dirnet_tf.itk import (  # noqa: F401
    DEFAULT_MARGIN,
    itk_affine_transform,
    itk_bspline_transform,
    itk_geometry,
    itk_step_transforms,
    map_points_world,
    write_itk_transform,
)
from dirnet_tf.spline_np import affine_step_matrix, spline_displacement_at  # noqa: F401
from dirnet_tf.spline_np import map_points_bspline as map_points  # noqa: F401
from dirnet_tf.spline_np import map_points_chain as map_points_steps  # noqa: F401

__all__ = []  # a shim: its names belong to the modules above
