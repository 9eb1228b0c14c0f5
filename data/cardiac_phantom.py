"""Synthetic beating-heart phantom: short-axis cine-MRI-like sequences with exact labels.

Each subject is a stack of short-axis slices (base to apex), each a cine of
``n_phases`` frames over one cardiac cycle.  The left ventricle is a ring of
myocardium (dark) around a blood-filled cavity (bright) with papillary
muscles; the right ventricle is a bright crescent beside it; the rest is
smoothly varying tissue with dark lung-like regions, a multiplicative coil
bias field and Rician noise.  Over the cycle the cavity contracts from
end-diastole (phase 0) to end-systole and relaxes again; contraction is
regionally non-uniform, the wall thickens (myocardial area is conserved), the
ventricle shifts and the RV contracts less than the LV.  Pixel spacing is
stated (default 1.5 mm).

Labels are exact: pixel ``(i, j)`` is LV cavity (1) when its centre lies
inside the analytic endocardium and myocardium (2) when it lies between
endocardium and epicardium; images are rendered with partial-volume
anti-aliasing (supersampling).  Every frame is labelled; ED/ES phases are
known.  The output has the layout of :mod:`data.sunnybrook` (see
:func:`data.sunnybrook.write_h5`), so experiments treat both alike::

    python -m data.cardiac_phantom --out=phantom.h5
"""

import sys

import numpy as np

from data.cardiac_h5 import SPLITS, write_h5

DEFAULT_SPACING = 1.5  # mm


def contraction_curve(n_phases, es_phase):
    """Contraction state in [0, 1] per phase: 0 at ED (phase 0), 1 at ES, smooth in between.

    Parameters
    ----------
    n_phases : number of frames in the cycle.
    es_phase : index of end-systole (``0 < es_phase < n_phases``).

    Returns
    -------
    float64 array ``[n_phases]``.
    """
    if not 0 < es_phase < n_phases:
        raise ValueError(f"es_phase must be in (0, n_phases={n_phases}), got {es_phase}")
    t = np.arange(n_phases, dtype=np.float64)
    up = 0.5 * (1.0 - np.cos(np.pi * t / es_phase))
    down = 0.5 * (1.0 + np.cos(np.pi * (t - es_phase) / (n_phases - es_phase)))
    return np.where(t <= es_phase, up, down)


def _smooth_field(rng, shape, n_bumps, scale_px):
    """Sum of random Gaussian bumps, normalised to [-1, 1]."""
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    field = np.zeros(shape)
    for _ in range(n_bumps):
        ci, cj = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        width = rng.uniform(0.5, 1.5) * scale_px
        field += rng.uniform(-1, 1) * np.exp(-((ii - ci) ** 2 + (jj - cj) ** 2) / (2 * width ** 2))
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def _fourier_shape(rng, amplitude, orders=(2, 3, 4)):
    """Random smooth radial modulation theta -> 1 + sum a_k cos(k (theta - phi_k))."""
    coeffs = [(k, amplitude * rng.uniform(0, 1) / k, rng.uniform(0, 2 * np.pi)) for k in orders]

    def modulation(theta):
        out = np.ones_like(theta)
        for k, a, phi in coeffs:
            out = out + a * np.cos(k * (theta - phi))
        return out

    return modulation


def make_subject(rng, n_slices=3, n_phases=20, size=64, spacing=DEFAULT_SPACING, noise=0.03,
                 shape_noise=1.0, es_fraction=0.35, supersample=3):
    """Render one phantom subject.

    Parameters
    ----------
    rng : ``numpy.random.Generator``.
    n_slices : short-axis slices, base to apex.
    n_phases : frames per cardiac cycle (ED = phase 0).
    size : image size in pixels (square).
    spacing : pixel spacing in mm (the anatomy is defined in mm, so a smaller
        spacing gives a larger heart in pixels).
    noise : standard deviation of the Rician noise (image range ~[0, 1]).
    shape_noise : scale of the random non-circular shape, regional wall motion
        and motion of the centre; 0 gives concentric circles that contract
        uniformly about a fixed centre (used by the tests).
    es_fraction : ES phase = ``round(es_fraction * n_phases)``.
    supersample : sub-pixels per axis for partial-volume rendering.

    Returns
    -------
    dict with ``images`` float32 ``[S, T, H, W]`` in [0, 1], ``labels`` uint8
    (0 background, 1 LV cavity, 2 myocardium), ``annotated`` bool ``[S, T, 2]``
    (all True), ``ed_phase``/``es_phase`` int32 ``[S]``, ``slice_locations``,
    ``trigger_times`` and ``attrs`` (geometry at ED, spacing).
    """
    if size < 16 or n_slices < 1 or n_phases < 3:
        raise ValueError(f"need size >= 16, n_slices >= 1, n_phases >= 3; got {size}, {n_slices}, {n_phases}")
    mm = 1.0 / spacing  # mm -> pixels
    es_phase = int(np.clip(round(es_fraction * n_phases), 1, n_phases - 1))
    contraction = contraction_curve(n_phases, es_phase)

    # Subject-level anatomy (mm).
    centre0 = (np.array([size, size]) - 1) / 2.0 + shape_noise * rng.uniform(-4, 4, 2) * mm
    shift_es = shape_noise * rng.uniform(-2.5, 2.5, 2) * mm
    endo_ed = rng.uniform(14.0, 18.0)
    wall_ed = rng.uniform(7.0, 9.5)
    es_ratio = rng.uniform(0.55, 0.72)  # ES/ED endocardial radius
    regional = shape_noise * rng.uniform(0.0, 0.35)  # regional wall-motion variation
    regional_phase = rng.uniform(0, 2 * np.pi)
    endo_shape = _fourier_shape(rng, 0.18 * shape_noise)
    epi_shape = _fourier_shape(rng, 0.10 * shape_noise)
    rv_angle = rng.uniform(0.6, 1.2) * np.pi  # RV on the patient's right (septal side)
    rv_width = rng.uniform(9.0, 14.0)
    rv_length = rng.uniform(1.0, 1.4)
    blood = rng.uniform(0.8, 0.92)
    myo = rng.uniform(0.22, 0.32)
    tissue_level = rng.uniform(0.42, 0.55)
    papillary = [(rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 2.5)) for _ in range(2)]

    # Static background (tissue texture, lungs, air outside an ellipse), bias field.
    fine = size * supersample
    tissue = tissue_level + 0.12 * _smooth_field(rng, (fine, fine), 8, fine / 6)
    ii, jj = np.meshgrid((np.arange(fine) + 0.5) / supersample - 0.5,
                         (np.arange(fine) + 0.5) / supersample - 0.5, indexing="ij")
    body_axes = np.array([rng.uniform(0.62, 0.75), rng.uniform(0.7, 0.85)]) * size
    body = ((ii - centre0[0]) / body_axes[0]) ** 2 + ((jj - centre0[1]) / body_axes[1]) ** 2 < 1.0
    background = np.where(body, tissue, 0.03)
    for _ in range(2):
        angle = rv_angle + np.pi + rng.uniform(-0.9, 0.9)
        dist = (endo_ed + wall_ed + rng.uniform(14, 22)) * mm
        lc = centre0 + dist * np.array([np.sin(angle), np.cos(angle)])
        lr = rng.uniform(8, 13) * mm
        lung = (ii - lc[0]) ** 2 + (jj - lc[1]) ** 2 < lr ** 2
        background = np.where(lung, 0.08, background)
    bias = 1.0 + 0.12 * _smooth_field(rng, (size, size), 3, size / 2)

    images = np.zeros((n_slices, n_phases, size, size), np.float32)
    labels = np.zeros((n_slices, n_phases, size, size), np.uint8)
    centre_px = np.stack([ii, jj])  # reused below
    pi, pj = np.meshgrid(np.arange(size, dtype=float), np.arange(size, dtype=float), indexing="ij")
    geometry = []
    for s in range(n_slices):
        taper = 1.0 - 0.3 * s / max(n_slices - 1, 1)  # smaller towards the apex
        r_endo_ed = endo_ed * taper * mm
        r_wall_ed = wall_ed * (0.9 + 0.1 * taper) * mm
        geometry.append((r_endo_ed, r_endo_ed + r_wall_ed))
        for t in range(n_phases):
            c = contraction[t]
            centre = centre0 + c * shift_es

            def radii(theta, c=c, r_endo_ed=r_endo_ed, r_wall_ed=r_wall_ed):
                ratio = es_ratio * (1.0 + regional * np.cos(theta - regional_phase))
                ratio = np.clip(ratio, 0.4, 0.95)
                endo0 = r_endo_ed * endo_shape(theta)
                epi0 = endo0 + r_wall_ed * epi_shape(theta)
                endo = endo0 * (1.0 - c * (1.0 - ratio))
                epi = np.sqrt(endo ** 2 + epi0 ** 2 - endo0 ** 2)  # conserved myocardial area
                return endo, epi

            def classify(gi, gj, centre=centre, radii=radii):
                di, dj = gi - centre[0], gj - centre[1]
                rho = np.hypot(di, dj)
                theta = np.arctan2(di, dj)
                endo, epi = radii(theta)
                return rho, theta, endo, epi

            # Exact labels at pixel centres.
            rho, _, endo, epi = classify(pi, pj)
            labels[s, t] = np.where(rho < endo, 1, np.where(rho < epi, 2, 0))

            # Image on the fine grid.
            rho, theta, endo, epi = classify(centre_px[0], centre_px[1])
            img = background.copy()
            # Right ventricle: crescent of blood beside the septum, contracting less.
            rv_dir = np.array([np.sin(rv_angle), np.cos(rv_angle)])
            r_epi_ed = r_endo_ed + r_wall_ed
            rv_c = centre + rv_dir * 0.55 * r_epi_ed
            di, dj = centre_px[0] - rv_c[0], centre_px[1] - rv_c[1]
            along = di * rv_dir[0] + dj * rv_dir[1]
            across = -di * rv_dir[1] + dj * rv_dir[0]
            rv_a = 0.55 * r_epi_ed + rv_width * mm * taper * (1.0 - 0.35 * c)
            rv_b = rv_length * r_epi_ed * (1.0 - 0.08 * c)
            rv = (along / rv_a) ** 2 + (across / rv_b) ** 2 < 1.0
            rv &= rho > epi + 1.5 * mm  # separated from the LV by a thin septal wall
            img = np.where(rv, blood * 0.95, img)
            img = np.where(rho < epi, myo, img)
            img = np.where(rho < endo, blood, img)
            for angle, radius in papillary:
                a_endo, _ = radii(np.array([angle]))
                pos = centre + 0.78 * a_endo[0] * np.array([np.sin(angle), np.cos(angle)])
                pr = radius * mm * (1.0 + 0.3 * c)
                pap = (centre_px[0] - pos[0]) ** 2 + (centre_px[1] - pos[1]) ** 2 < pr ** 2
                img = np.where(pap & (rho < endo), myo * 1.1, img)
            img = img.reshape(size, supersample, size, supersample).mean(axis=(1, 3)) * bias
            n1 = rng.normal(0, noise, img.shape)
            n2 = rng.normal(0, noise, img.shape)
            images[s, t] = np.clip(np.sqrt((img + n1) ** 2 + n2 ** 2), 0, 1)
    return dict(
        images=images,
        labels=labels,
        annotated=np.ones((n_slices, n_phases, 2), bool),
        ed_phase=np.zeros(n_slices, np.int32),
        es_phase=np.full(n_slices, es_phase, np.int32),
        slice_locations=(-10.0 * np.arange(n_slices)).astype(np.float32),
        trigger_times=np.tile((np.arange(n_phases) * 1000.0 / n_phases).astype(np.float32), (n_slices, 1)),
        attrs=dict(group="phantom", series="phantom", spacing_mm=[spacing, spacing],
                   native_spacing_mm=[spacing, spacing],
                   lv_centre_ed_px=centre0.tolist(),
                   endo_radius_ed_px=[g[0] for g in geometry], epi_radius_ed_px=[g[1] for g in geometry],
                   shape_noise=shape_noise, noise=noise),
    )


def make_phantom(n_train=24, n_valid=4, n_test=8, seed=0, **subject_kwargs):
    """A phantom data set split by subject.

    Parameters
    ----------
    n_train, n_valid, n_test : subjects per split.
    seed : the data set is a deterministic function of the seed.
    **subject_kwargs : passed to :func:`make_subject` (``n_slices``,
        ``n_phases``, ``size``, ``spacing``, ``noise``, ...).

    Returns
    -------
    ``(patients, splits)``: dict name -> subject dict (with ``split``), and
    dict split -> list of names.
    """
    counts = dict(zip(SPLITS, (n_train, n_valid, n_test)))
    if any(n < 0 for n in counts.values()) or sum(counts.values()) == 0:
        raise ValueError(f"subject counts must be >= 0 and not all 0, got {counts}")
    seeds = np.random.SeedSequence(seed).spawn(sum(counts.values()))
    patients, splits, k = {}, {s: [] for s in SPLITS}, 0
    for split in SPLITS:
        for n in range(counts[split]):
            name = f"PH-{split}-{n:03d}"
            subject = make_subject(np.random.default_rng(seeds[k]), **subject_kwargs)
            subject["split"] = split
            subject["attrs"]["split"] = split
            patients[name] = subject
            splits[split].append(name)
            k += 1
    return patients, splits


def write_phantom(path, n_train=24, n_valid=4, n_test=8, seed=0, **subject_kwargs):
    """Generate the phantom and write it in the cardiac HDF5 layout of :mod:`data.sunnybrook`."""
    patients, splits = make_phantom(n_train, n_valid, n_test, seed=seed, **subject_kwargs)
    spacing = subject_kwargs.get("spacing", DEFAULT_SPACING)
    size = subject_kwargs.get("size", 64)
    attrs = dict(source="dirnet-tf synthetic beating-heart phantom", created_by="python -m data.cardiac_phantom",
                 spacing_mm=[spacing, spacing], crop_size=size, seed=seed, skipped=[],
                 split_mode="phantom", subject_kwargs=dict(subject_kwargs))
    write_h5(path, patients, splits, attrs)
    return patients, splits


def main(argv=None):
    """Command line: ``python -m data.cardiac_phantom --out=FILE.h5``."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m data.cardiac_phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n_train", type=int, default=24)
    parser.add_argument("--n_valid", type=int, default=4)
    parser.add_argument("--n_test", type=int, default=8)
    parser.add_argument("--n_slices", type=int, default=3)
    parser.add_argument("--n_phases", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--spacing", type=float, default=DEFAULT_SPACING)
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_phantom(args.out, args.n_train, args.n_valid, args.n_test, seed=args.seed, n_slices=args.n_slices,
                  n_phases=args.n_phases, size=args.size, spacing=args.spacing, noise=args.noise)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
