"""Register two images with an exported DIRNet SavedModel.

    python -m experiments.register --model=exports/mnist --fixed=a.png --moving=b.png \\
        --out=warped.png [--displacement=disp.npy] [--figure=registration.png]

Images are PNG/JPEG/TIFF/BMP (read with Pillow) or ``.npy`` arrays ``[H, W]`` or
``[H, W, C]``.  Integer images are scaled to ``[0, 1]`` (uint8 by 255, uint16 by
65535); float images are used as they are.  RGB(A) images are converted to grey
when the model has one channel, as ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``
in floating point (alpha ignored; the same for PNG and ``.npy`` input, and as
:mod:`dirnet_tf.readers` does).  The image size must match the model's input
size (an error names both).

``--out`` receives the warped moving image (an 8-bit PNG clipped to ``[0, 1]``, or
float32 ``.npy``); ``--displacement`` the dense field ``[H, W, 2]`` (pixels, ij
order: ``warped(x) = moving(x + displacement(x))``) as ``.npy``; ``--figure`` a
panel of fixed / moving / warped / deformation grid.
"""

import os
import sys

import numpy as np
from absl import app, flags

flags.DEFINE_string("model", None, "Exported SavedModel directory (e.g. exports/mnist).")
flags.DEFINE_string("fixed", None, "Fixed image file (.png, .jpg, .tif, .npy, ...).")
flags.DEFINE_string("moving", None, "Moving image file.")
flags.DEFINE_string("out", None, "Where to write the warped moving image (.png or .npy).")
flags.DEFINE_string("displacement", None, "Optional .npy for the displacement field [H, W, 2].")
flags.DEFINE_string("figure", None, "Optional .png with fixed / moving / warped / grid panels.")

FLAGS = flags.FLAGS
# Grey from RGB: ITU-R 601 luma weights (as dirnet_tf.readers).
LUMA = np.array([0.299, 0.587, 0.114])


class RegisterError(ValueError):
    """Bad input to the registration command; the message names the file."""


def read_image(path, channels=1):
    """Read an image file as float32 ``[H, W, channels]`` in ``[0, 1]`` (integers scaled).

    Parameters
    ----------
    path : str
        Image (Pillow formats) or ``.npy``.
    channels : int
        Channels the model expects: RGB(A) is converted to grey (:data:`LUMA`
        weights, alpha ignored) for 1, grey is repeated for 3.

    Returns
    -------
    numpy.ndarray
    """
    if not os.path.isfile(path):
        raise RegisterError(f"image file {path} does not exist")
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as img:
                if channels == 1 and img.mode not in ("L", "I;16", "I;16B", "I", "F"):
                    img = img.convert("RGB")  # to grey below, like an RGB .npy
                elif channels == 3 and img.mode != "RGB":
                    img = img.convert("RGB")
                array = np.array(img)
    except RegisterError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure
        raise RegisterError(f"cannot read image {path}: {exc}") from exc
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        info = np.iinfo(array.dtype) if array.dtype != bool else None
        array = array.astype(np.float32) / (float(info.max) if info else 1.0)
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise RegisterError(f"image {path} has shape {array.shape}; expected [H, W] or [H, W, C]")
    if array.shape[-1] != channels:
        if array.shape[-1] in (3, 4) and channels == 1:
            array = (array[..., :3].astype(np.float64) @ LUMA)[..., None].astype(np.float32)
        elif array.shape[-1] == 1 and channels == 3:
            array = np.repeat(array, 3, axis=-1)
        else:
            raise RegisterError(f"image {path} has {array.shape[-1]} channels; the model expects {channels}")
    if not np.isfinite(array).all():
        raise RegisterError(f"image {path} contains non-finite values")
    return array


def load_model(path):
    """Load an exported model; returns ``(serving signature, (H, W), channels)``."""
    from dirnet_tf.inference import load_export

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise RegisterError(f"{path} is not a SavedModel directory (no saved_model.pb); "
                            "export one with `python -m experiments.mnist --export_only`")
    try:
        fn, _ = load_export(path)
    except ValueError as exc:
        raise RegisterError(str(exc)) from exc
    spec = fn.structured_input_signature[1]
    if set(spec) != {"fixed", "moving"}:
        raise RegisterError(f"{path}: serving_default takes {sorted(spec)}, expected fixed and moving")
    shape = spec["fixed"].shape
    return fn, tuple(int(n) for n in shape[1:-1]), int(shape[-1])


def register(model_dir, fixed_path, moving_path):
    """Register ``moving_path`` to ``fixed_path`` with the model in ``model_dir``.

    Returns
    -------
    dict
        ``fixed``, ``moving``, ``warped`` (``[H, W, C]``), ``displacement`` (``[H, W, 2]``).
    """
    fn, size, channels = load_model(model_dir)
    images = {}
    for name, path in (("fixed", fixed_path), ("moving", moving_path)):
        image = read_image(path, channels)
        if image.shape[:2] != size:
            raise RegisterError(
                f"the {name} image {path} is {image.shape[0]}x{image.shape[1]} pixels but the model "
                f"{model_dir} expects {size[0]}x{size[1]}"
            )
        images[name] = image
    out = fn(fixed=images["fixed"][None], moving=images["moving"][None])
    return dict(images, warped=out["warped"].numpy()[0], displacement=out["displacement"].numpy()[0])


def write_image(path, image):
    """Write ``[H, W, C]`` in ``[0, 1]`` as an 8-bit PNG (clipped) or as float32 ``.npy``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".npy"):
        np.save(path, image.astype(np.float32))
        return
    from PIL import Image

    data = np.clip(np.rint(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    missing = [n for n in ("model", "fixed", "moving", "out") if not FLAGS[n].value]
    if missing:
        print("error: missing " + ", ".join("--" + n for n in missing), file=sys.stderr)
        return 2
    try:
        result = register(FLAGS.model, FLAGS.fixed, FLAGS.moving)
    except (RegisterError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from dirnet_tf import metrics

    write_image(FLAGS.out, result["warped"])
    written = [FLAGS.out]
    if FLAGS.displacement:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.displacement)), exist_ok=True)
        np.save(FLAGS.displacement, result["displacement"].astype(np.float32))
        written.append(FLAGS.displacement)
    if FLAGS.figure:
        import matplotlib.pyplot as plt

        from dirnet_tf.plotting import registration_figure

        fig = registration_figure(result["fixed"][None], result["moving"][None], result["warped"][None],
                                  result["displacement"][None])
        fig.savefig(FLAGS.figure, dpi=150)
        plt.close(fig)
        written.append(FLAGS.figure)
    before = metrics.ncc(result["fixed"], result["moving"])
    after = metrics.ncc(result["fixed"], result["warped"])
    folding = metrics.folding_fraction(result["displacement"])
    print(f"NCC {before:.4f} -> {after:.4f}, folding {100 * folding:.2f}% of pixels; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
