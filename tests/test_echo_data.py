"""data.echo: pydicom's real echocardiogram as a cine, its ultrasound region box and sector mask."""

import os

import numpy as np
import pytest

from data import echo as echo_data


@pytest.fixture(scope="module")
def cine():
    """The example file's frames, stacked ``[T, H, W]``, its region box and the sector mask."""
    pytest.importorskip("pydicom")
    path = echo_data.example_echo_file()
    frames = echo_data.read_echo_cine(path)
    stack = np.stack([f.array for f in frames])
    box = echo_data.ultrasound_box(path, frames[0])
    return {"path": path, "frames": frames, "stack": stack, "box": box, "mask": echo_data.sector_mask(stack, box)}


def test_example_cine_is_30_grey_frames_with_the_corrected_pixel_size(cine):
    frames = cine["frames"]
    assert os.path.basename(cine["path"]) == "examples_ybr_color.dcm"
    assert len(frames) == 30 and {f.shape for f in frames} == {(240, 320)}
    assert len({f.group for f in frames}) == 1 and cine["stack"].ndim == 3  # grey, one cine
    np.testing.assert_allclose(frames[0].spacing, (1.021, 1.021), atol=1e-3)  # 2 x 0.5105 mm
    # The region box (x 84-595, y 31-414 in the metadata) halved, as the reader does.
    assert cine["box"] == (15, 207, 42, 298)


def test_sector_mask_covers_the_fan_and_excludes_the_static_overlay(cine):
    mask, stack, (r0, r1, c0, c1) = cine["mask"], cine["stack"], cine["box"]
    assert mask.shape == (240, 320) and mask.dtype == bool
    assert 0.15 < mask.mean() < 0.40
    # Inside the ultrasound region box only.
    outside_box = np.ones_like(mask)
    outside_box[r0:r1 + 1, c0:c1 + 1] = False
    assert not mask[outside_box].any()
    # Hand-checked pixels (row, column) inside the fan: septum, LV cavity, valve plane, far field.
    for point in [(130, 160), (100, 175), (150, 145), (185, 160), (60, 170)]:
        assert mask[point], point
    # ... and outside it: the "PLA" label, the orientation marker, the depth scale, "19", the status bar.
    for point in [(5, 15), (20, 190), (100, 300), (202, 292), (230, 160), (5, 305)]:
        assert not mask[point], point
    # Every visible pixel that never changes over time (text, markers, scale) is outside the mask.
    std, mean = stack.std(axis=0), stack.mean(axis=0)
    static_overlay = (std < 1e-3) & (mean > 10)
    assert static_overlay.sum() > 500  # the overlay is there ...
    assert not (static_overlay & mask).any()  # ... and none of it in the sector
    # The strongly changing pixels (the beating heart) are inside.
    moving = std > 0.3 * np.percentile(std, 99)
    assert (moving & mask).sum() > 0.97 * moving.sum()


def test_sector_mask_of_a_synthetic_fan_with_static_text():
    """A flickering fan with a static bright label inside: the label is cut out, the fan kept."""
    rng = np.random.default_rng(0)
    t, h, w = 12, 80, 100
    rows, cols = np.mgrid[:h, :w]
    angle = np.arctan2(cols - 50, rows - 5)
    fan = (np.hypot(rows - 5, cols - 50) < 70) & (np.abs(angle) < 0.6) & (rows > 5)
    frames = 20 * rng.random((t, h, w)) * fan + 5 * fan
    frames[:, 40:44, 45:55] = 200.0  # static text inside the fan
    frames[:, 2:6, 2:12] = 200.0  # static text outside
    mask = echo_data.sector_mask(frames)
    assert not mask[40:44, 45:55].any() and not mask[2:6, 2:12].any()
    assert mask[60, 50] and mask[30, 50] and not mask[70, 5]
    inner = fan.copy()
    inner[36:48, 41:59] = False
    assert mask[inner].mean() > 0.95


def test_sector_grid_shape_holds_the_mask_in_multiples_of_the_stage():
    """A mask reaching 30 pixels above and 10 below the centre row, at 2x coarser model spacing."""
    mask = np.zeros((101, 81), bool)
    mask[20:61, 30:51] = True  # rows 20..60: the centre row is 50 -> reach 30 (+1 margin)
    shape = echo_data.sector_grid_shape(mask, (1.0, 1.0), (2.0, 2.0), 8)
    # rows: ceil(2 * 31 / 2) = 31 -> 32; columns: centre 40, reach 10 + 1 -> 11 -> 16
    assert shape == (32, 16)
