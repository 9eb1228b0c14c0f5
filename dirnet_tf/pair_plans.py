"""Pairing plans: which (fixed, moving) pairs of an image collection a run trains and evaluates on.

Plain numpy, no TensorFlow.  Images are referred to by their index in the collection (input
order); a *plan* is an int64 array ``[P, 2]`` of (fixed, moving) indices.

* :func:`parse_pairs_spec` reads a ``--pairs`` value, :func:`parse_split` a ``--split`` value;
* :func:`split_by_group` splits a collection into train / valid / test, whole groups at a time;
  :func:`split_within_groups` splits every group in time instead;
* :func:`pair_candidates` lists the pairs a mode allows inside one split,
  :func:`evaluation_pairs` fixes the pairs of an evaluation;
* :func:`find_image` and :func:`read_pair_list` resolve the images named by ``--pairs=atlas:PATH``
  and ``--pairs=list:CSV``.

The samplers that draw training batches from a plan (``tf.data``) are in :mod:`dirnet_tf.pairs`.
Mistakes in the input raise :class:`PairingError`, a :class:`ValueError` whose message says what
to fix.

``--pairs=MODE`` selects which (fixed, moving) pairs a collection of images gives:

* ``random``: any two different images;
* ``within_group``: two different images of one group (the frames of a cine, the time points of
  a subject: ``Image.group``, e.g. the CSV ``group`` column, or one multi-frame file);
* ``sequence``: two frames of one group at most ``max_frame_gap`` apart in the group's order
  (the input order), in both directions;
* ``atlas:PATH``: one fixed atlas image, every other image moving;
* ``list:CSV``: the explicit ``fixed,moving`` rows of a CSV file (see :func:`read_pair_list`);
* ``synthetic``: no pair of two images: every pair is one image and a copy of it deformed by a
  known random field (:mod:`dirnet_tf.synthetic`); it lists no candidates
  (:func:`pair_candidates` returns None).

Splits (:func:`split_by_group`) are made by group, so the frames of one group never fall into
two splits; pairs are then formed inside one split (``subset``).
"""

import csv
import os

import numpy as np

from dirnet_tf.readers import InputError

__all__ = [
    "PAIR_MODES", "SPLIT_NAMES", "PairingError", "parse_pairs_spec", "parse_split", "split_by_group",
    "split_within_groups", "pair_candidates", "evaluation_pairs", "find_image", "read_pair_list",
    "pair_index_array", "require_two_images",
]

#: The pairing modes (``atlas`` and ``list`` take an argument: ``atlas:PATH``, ``list:CSV``).
PAIR_MODES = ("random", "within_group", "sequence", "atlas", "list", "synthetic")
SPLIT_NAMES = ("train", "valid", "test")
# Groups / files named in one error message at most.
_MAX_NAMED = 5


class PairingError(InputError):
    """A mistake in the pairing or split specification (a :class:`ValueError`); the message says what to fix."""


def _name(names, i):
    return str(names[i]) if names is not None else f"image {i}"


def _group_ids(groups):
    """Group number of each image (first-appearance order) and the group labels.

    ``None`` (and an empty string) means *no group*: each such image is a group
    of its own, labelled ``None``.
    """
    ids = np.empty(len(groups), np.int64)
    labels, index = [], {}
    for i, g in enumerate(groups):
        if g is None or (isinstance(g, str) and not g.strip()):
            ids[i] = len(labels)
            labels.append(None)
            continue
        key = g.item() if isinstance(g, np.generic) else g
        if key not in index:
            index[key] = len(labels)
            labels.append(key)
        ids[i] = index[key]
    return ids, labels


def _members(groups, subset):
    """``[(label, [image indices in input order]), ...]`` for the groups of ``subset``."""
    ids, labels = _group_ids(groups)
    members = {}
    for i in subset:
        members.setdefault(int(ids[i]), []).append(int(i))
    return [(labels[g], members[g]) for g in sorted(members)]


def _check_subset(subset, n):
    if subset is None:
        return np.arange(n, dtype=np.int64)
    subset = np.unique(np.asarray(subset, dtype=np.int64).reshape(-1))
    if subset.size and (subset[0] < 0 or subset[-1] >= n):
        raise PairingError(f"subset indices must lie in 0..{n - 1}, got {subset[0]}..{subset[-1]}")
    return subset


def pair_index_array(pairs, n, what="pairs"):
    """``pairs`` checked as an int64 ``[P, 2]`` array of (fixed, moving) indices into ``N = n`` images.

    Raises
    ------
    PairingError
        Not an integer array ``[P, 2]``, or an index outside ``0..n - 1`` (``what`` names the pairs).
    """
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        pairs = pairs.reshape(0, 2)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        raise PairingError(f"{what} must be an integer array [P, 2] of (fixed, moving) image indices, "
                           f"got shape {pairs.shape} of {pairs.dtype}")
    pairs = pairs.astype(np.int64)
    bad = np.flatnonzero((pairs < 0).any(axis=1) | (pairs >= n).any(axis=1))
    if bad.size:
        raise PairingError(f"{what}: pair {bad[0]} {pairs[bad[0]].tolist()} names an image outside 0..{n - 1}")
    return pairs


def require_two_images(subset, names, mode):
    """Raise :class:`PairingError` unless ``subset`` (image indices) holds at least two images.

    ``names`` (``Image.source`` per image, or None) and ``mode`` (the ``--pairs`` mode) only
    word the message.
    """
    if subset.size < 2:
        got = ", ".join(_name(names, i) for i in subset) or "none"
        raise PairingError(f"--pairs={mode} needs at least two usable images, got {subset.size} ({got}); "
                           "add images (or check that they were read: see the skipped files)")


def parse_pairs_spec(spec):
    """Split a ``--pairs`` value into ``(mode, argument)``.

    Parameters
    ----------
    spec : str
        ``random``, ``within_group``, ``sequence``, ``atlas:PATH``, ``list:CSV``
        or ``synthetic``.

    Returns
    -------
    mode : str
        One of :data:`PAIR_MODES`.
    argument : str or None
        The atlas image path or the pair-list CSV path; None for the other modes.

    Raises
    ------
    PairingError
        An unknown mode, or ``atlas`` / ``list`` without their path.
    """
    text = str(spec).strip()
    mode, sep, argument = text.partition(":")
    mode = mode.strip()
    choices = "random, within_group, sequence, atlas:PATH, list:CSV, synthetic"
    if mode not in PAIR_MODES:
        raise PairingError(f"--pairs={text}: unknown pairing mode {mode!r}; use one of {choices}")
    if mode in ("atlas", "list"):
        argument = argument.strip()
        if not argument:
            what = "the atlas image" if mode == "atlas" else "the CSV file of fixed,moving rows"
            raise PairingError(f"--pairs={text}: give {what} as --pairs={mode}:PATH")
        return mode, argument
    if sep:
        raise PairingError(f"--pairs={text}: mode {mode!r} takes no argument; use one of {choices}")
    return mode, None


def parse_split(text):
    """Parse ``--split=TRAIN,VALID,TEST`` (e.g. ``"0.8,0.1,0.1"``) into three floats.

    Raises
    ------
    PairingError
        Not three numbers, a negative fraction, a sum other than 1, or a zero
        train fraction (see :func:`split_by_group`).
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise PairingError(f"--split={text}: give three fractions TRAIN,VALID,TEST that sum to 1, "
                           "e.g. --split=0.8,0.1,0.1")
    return _check_fractions(values)


def _check_fractions(fractions):
    try:
        values = tuple(float(f) for f in np.asarray(fractions, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        raise PairingError(f"--split={fractions!r}: give three fractions TRAIN,VALID,TEST that sum to 1, "
                           "e.g. --split=0.8,0.1,0.1") from None
    shown = ",".join(f"{v:g}" for v in values)
    if len(values) != 3 or not all(np.isfinite(values)):
        raise PairingError(f"--split={shown}: give three fractions TRAIN,VALID,TEST that sum to 1, "
                           "e.g. --split=0.8,0.1,0.1")
    if min(values) < 0:
        raise PairingError(f"--split={shown}: fractions cannot be negative")
    if abs(sum(values) - 1.0) > 1e-6:
        raise PairingError(f"--split={shown}: the fractions sum to {sum(values):g}, not 1; "
                           "e.g. --split=0.8,0.1,0.1")
    if values[0] == 0:
        raise PairingError(f"--split={shown}: the train fraction is 0, which leaves nothing to train on; "
                           "give train a positive fraction, e.g. --split=0.8,0.1,0.1")
    return values


def split_by_group(groups, fractions=(0.8, 0.1, 0.1), seed=0):
    """Split image indices into train / valid / test, whole groups at a time.

    The groups are shuffled with ``numpy.random.default_rng(seed)`` (in their
    order of first appearance before shuffling) and dealt out: the first
    ``n_valid`` groups go to valid, the next ``n_test`` to test, the rest to
    train.  Fractions count **groups**, not images.  With ``G`` groups:

    * ``n_valid = floor(f_valid * G + 0.5)``, ``n_test = floor(f_test * G + 0.5)``
      (rounded half up);
    * when ``G >= 3``, a split with a positive fraction gets at least one group;
    * train keeps at least one group: while ``n_valid + n_test > G - 1``, the
      larger of the two (test on a tie) gives one back.

    So one or two groups all go to train unless valid/test round up to a
    group (two groups with ``0.5,0.5,0``: one each); three groups with
    ``0.8,0.1,0.1`` give one group to each split.

    Parameters
    ----------
    groups : sequence ``[N]``
        Group of each image (str, int, ...); ``None`` (or ``""``) = no group:
        such an image is a group of its own.
    fractions : sequence of 3 float or str
        Train, valid and test fractions, non-negative, summing to 1, train
        positive; a string ``"0.8,0.1,0.1"`` is parsed with :func:`parse_split`.
    seed : int
        Shuffle seed; the split depends only on ``(groups, fractions, seed)``.

    Returns
    -------
    dict
        ``{"train": idx, "valid": idx, "test": idx}``, each a sorted int64
        array of image indices; together they hold every index exactly once.

    Raises
    ------
    PairingError
        Bad fractions (see :func:`parse_split`), or no images.
    """
    fractions = parse_split(fractions) if isinstance(fractions, str) else _check_fractions(fractions)
    ids, labels = _group_ids(list(groups))
    n_groups = len(labels)
    if n_groups == 0:
        raise PairingError("no images to split; check --images")
    counts = [int(np.floor(f * n_groups + 0.5)) for f in fractions[1:]]
    if n_groups >= 3:
        counts = [max(c, 1) if f > 0 else c for c, f in zip(counts, fractions[1:])]
    while sum(counts) > n_groups - 1:
        counts[0 if counts[0] > counts[1] else 1] -= 1
    n_valid, n_test = counts
    order = np.random.default_rng(int(seed)).permutation(n_groups)
    split_of_group = np.zeros(n_groups, np.int64)  # 0 train, 1 valid, 2 test
    split_of_group[order[:n_valid]] = 1
    split_of_group[order[n_valid:n_valid + n_test]] = 2
    split_of_image = split_of_group[ids]
    return {name: np.flatnonzero(split_of_image == k).astype(np.int64) for k, name in enumerate(SPLIT_NAMES)}


def pair_candidates(groups, mode, max_frame_gap=1, atlas_index=None, pairs=None, subset=None, names=None):
    """All (fixed, moving) index pairs that ``mode`` allows within a set of images.

    Parameters
    ----------
    groups : sequence ``[N]``
        Group of each image of the whole collection (``None`` = no group: a
        group of its own).  The order of a group's images is their input order.
    mode : str
        One of :data:`PAIR_MODES` (see :func:`parse_pairs_spec`):

        * ``"random"``: returns None -- all ordered pairs of distinct images
          are allowed; they are not listed (``N * (N - 1)`` rows), use
          :func:`dirnet_tf.pairs.random_pair_sampler` / :func:`evaluation_pairs` instead;
        * ``"within_group"``: every ordered pair of distinct images of one
          group; every group needs at least two images;
        * ``"sequence"``: frames of one group whose positions in the group
          differ by 1..``max_frame_gap`` (both directions); every group needs
          at least two images;
        * ``"atlas"``: ``(atlas_index, i)`` for every other image ``i``;
        * ``"list"``: the rows of ``pairs`` (order and repeats kept);
        * ``"synthetic"``: returns None -- the pairs are made from single
          images by :mod:`dirnet_tf.synthetic`, not chosen.
    max_frame_gap : int
        ``sequence`` only: largest frame distance (>= 1).
    atlas_index : int
        ``atlas`` only: index of the atlas image; it is the fixed image even
        when it lies outside ``subset`` (the atlas is shared by all splits).
    pairs : array ``[P, 2]`` of int
        ``list`` only: explicit (fixed, moving) indices (:func:`read_pair_list`).
    subset : array of int, optional
        Only images of this set are paired (one split of
        :func:`split_by_group`); all images when None.  ``list`` pairs with an
        image outside the subset are left out.
    names : sequence of str, optional
        Image names (``Image.source``) for error messages.

    Returns
    -------
    np.ndarray or None
        int64 ``[P, 2]`` of global (fixed, moving) indices, sorted by (fixed,
        moving) except for ``list`` (file order); None for ``random`` and
        ``synthetic``.

    Raises
    ------
    PairingError
        Unknown mode; fewer than two usable images; a group of fewer than two
        images (``within_group``, ``sequence``; the message names the group and
        its files); a missing or bad ``atlas_index`` / ``pairs`` /
        ``max_frame_gap``; no pair left in ``subset``.
    """
    groups = list(groups)
    n = len(groups)
    if mode not in PAIR_MODES:
        raise PairingError(f"unknown pairing mode {mode!r}; use one of {', '.join(PAIR_MODES)}")
    subset = _check_subset(subset, n)
    if mode == "synthetic":
        if subset.size < 1:
            raise PairingError("--pairs=synthetic needs at least one image")
        return None

    if mode == "atlas":
        if atlas_index is None or not 0 <= int(atlas_index) < n:
            raise PairingError(f"--pairs=atlas needs the atlas image's index in 0..{n - 1}, got {atlas_index!r}")
        atlas_index = int(atlas_index)
        moving = subset[subset != atlas_index]
        if moving.size == 0:
            raise PairingError(f"--pairs=atlas needs at least one image besides the atlas "
                               f"{_name(names, atlas_index)}; add images to register to it")
        return np.stack([np.full_like(moving, atlas_index), moving], axis=1)

    if mode == "list":
        if pairs is None:
            raise PairingError("--pairs=list needs the pairs (read them with read_pair_list)")
        pairs = pair_index_array(pairs, n, "--pairs=list")
        inside = np.zeros(n, bool)
        inside[subset] = True
        kept = pairs[inside[pairs[:, 0]] & inside[pairs[:, 1]]]
        if kept.shape[0] == 0:
            raise PairingError(f"--pairs=list: none of the {pairs.shape[0]} listed pairs has both images among "
                               f"the {subset.size} images of this split; list pairs of images of one group, "
                               "or change --split")
        return kept

    require_two_images(subset, names, mode)
    if mode == "random":
        return None

    if mode == "sequence" and (int(max_frame_gap) != max_frame_gap or max_frame_gap < 1):
        raise PairingError(f"--max_frame_gap={max_frame_gap}: give a whole number >= 1")
    members = _members(groups, subset)
    small = [(label, idx) for label, idx in members if len(idx) < 2]
    if small:
        described = []
        for label, idx in small[:_MAX_NAMED]:
            files = ", ".join(_name(names, i) for i in idx)
            described.append(f"{files} (no group)" if label is None else f"group {label!r}: {files}")
        more = f" and {len(small) - _MAX_NAMED} more" if len(small) > _MAX_NAMED else ""
        raise PairingError(
            f"--pairs={mode} pairs images of one group, so every group needs at least two images; "
            f"{len(small)} group(s) have only one: {'; '.join(described)}{more}. Give these images a group "
            "with others (the CSV `group` column), remove them, or use --pairs=random")
    out = []
    for _, idx in members:
        idx = np.asarray(idx, np.int64)
        pos = np.arange(idx.size)
        gap = np.abs(pos[:, None] - pos[None, :])
        allowed = gap >= 1 if mode == "within_group" else (gap >= 1) & (gap <= int(max_frame_gap))
        f, m = np.nonzero(allowed)
        out.append(np.stack([idx[f], idx[m]], axis=1))
    result = np.concatenate(out, axis=0)
    return result[np.lexsort((result[:, 1], result[:, 0]))]


def evaluation_pairs(groups, mode, max_frame_gap=1, atlas_index=None, pairs=None, subset=None, names=None,
                     max_pairs=None, seed=0):
    """A fixed, reproducible list of (fixed, moving) pairs for validation or test.

    For every mode but ``random`` these are the pairs of :func:`pair_candidates`
    (same arguments); when there are more than ``max_pairs``, a seeded sample
    of ``max_pairs`` of them without replacement, kept in candidate order.
    For ``random``: ``max_pairs`` (default: as many as the images of
    ``subset``, capped at ``n * (n - 1)``) distinct ordered pairs of distinct
    images, drawn with ``seed`` and sorted by (fixed, moving).

    Parameters
    ----------
    groups, mode, max_frame_gap, atlas_index, pairs, subset, names
        As for :func:`pair_candidates`.
    max_pairs : int, optional
        Most pairs returned (None: all candidates; see above for ``random``).
    seed : int
        Seed of the sample; the result depends only on the arguments.

    Returns
    -------
    np.ndarray
        int64 ``[P, 2]`` of global (fixed, moving) indices.
    """
    if max_pairs is not None and (int(max_pairs) != max_pairs or max_pairs < 1):
        raise PairingError(f"max_pairs={max_pairs}: give a whole number >= 1 (or None for all)")
    if mode == "synthetic":
        raise PairingError("--pairs=synthetic: evaluation pairs are made with "
                           "dirnet_tf.synthetic.synthetic_evaluation_pairs, not chosen among the images")
    rng = np.random.default_rng(int(seed))
    candidates = pair_candidates(groups, mode, max_frame_gap=max_frame_gap, atlas_index=atlas_index,
                                 pairs=pairs, subset=subset, names=names)
    if candidates is not None:
        if max_pairs is not None and candidates.shape[0] > max_pairs:
            keep = np.sort(rng.choice(candidates.shape[0], int(max_pairs), replace=False))
            candidates = candidates[keep]
        return candidates
    members = _check_subset(subset, len(list(groups)))
    n = members.size
    count = min(n if max_pairs is None else int(max_pairs), n * (n - 1))
    codes = np.sort(rng.choice(n * (n - 1), count, replace=False))
    fixed = codes // (n - 1)
    other = codes % (n - 1)
    moving = other + (other >= fixed)
    return np.stack([members[fixed], members[moving]], axis=1).astype(np.int64)


def _norm_path(path):
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def find_image(reference, sources, base_dir=None):
    """Index of the image that ``reference`` names among ``sources``, or None.

    Parameters
    ----------
    reference : str
        A path as in ``Image.source`` (``a.png``, ``stack.npy[2]``,
        ``cine.dcm[frame 5]``, ``data.h5:/images[3]``), relative to
        ``base_dir`` (to the current folder when None) unless absolute.
    sources : sequence of str
        ``Image.source`` of each image; a relative source is taken relative to
        the current folder, as when it was read.
    base_dir : str, optional
        Folder of relative references (the folder of a pair-list CSV).

    Returns
    -------
    int or None
        None when no image has that source.

    Raises
    ------
    PairingError
        Several images have that source (the same file given twice).
    """
    reference = str(reference).strip()
    if base_dir is not None and not os.path.isabs(reference):
        reference = os.path.join(base_dir, reference)
    target = _norm_path(reference)
    hits = [i for i, s in enumerate(sources) if _norm_path(s) == target]
    if len(hits) > 1:
        raise PairingError(f"{reference}: {len(hits)} images have this source (indices {hits[:_MAX_NAMED]}); "
                           "give each file once in --images")
    return hits[0] if hits else None


def read_pair_list(csv_path, sources):
    """Read the (fixed, moving) pairs of a ``--pairs=list:CSV`` file.

    Format: a CSV file with a header row holding ``fixed`` and ``moving``
    columns (case-insensitive; other columns are ignored; blank rows are
    skipped).  Each cell names one image of ``--images`` either

    * by **path**, as the image's ``Image.source``: relative paths are
      relative to the CSV file's folder; one frame of a multi-image file is
      named with its index suffix, e.g. ``cine.dcm[frame 5]``,
      ``stack.npy[2]``, ``data.h5:/images[3]``; or
    * by **index**: a cell of digits only (``12``) is the 0-based position of
      the image in ``--images`` order (after unreadable files were skipped).

    Parameters
    ----------
    csv_path : str or os.PathLike
    sources : sequence of str
        ``Image.source`` of each image, in collection order.

    Returns
    -------
    np.ndarray
        int64 ``[P, 2]`` of (fixed, moving) indices in file order.

    Raises
    ------
    PairingError
        Unreadable file, missing header columns, no rows, a row naming an
        unknown image or an index out of range (file and row named), or a row
        pairing an image with itself.
    """
    csv_path = os.fspath(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    sources = [str(s) for s in sources]
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            if "fixed" not in fields or "moving" not in fields:
                raise PairingError(f"{csv_path}: a pair list needs a header row with `fixed` and `moving` columns "
                                   f"(found {reader.fieldnames}); e.g. the first line `fixed,moving`")
            rows = [(reader.line_num, (row.get(fields["fixed"]) or "").strip(),
                     (row.get(fields["moving"]) or "").strip()) for row in reader]
    except OSError as exc:
        raise PairingError(f"--pairs=list:{csv_path}: cannot read the pair list ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise PairingError(f"{csv_path}: not a text CSV file ({exc})") from exc

    def resolve(line, column, cell):
        if cell.isascii() and cell.isdigit():
            index = int(cell)
            if index >= len(sources):
                raise PairingError(f"{csv_path}, line {line}: {column} index {index} is out of range; "
                                   f"there are {len(sources)} images (indices 0..{len(sources) - 1})")
            return index
        index = find_image(cell, sources, base)
        if index is None:
            path = cell if os.path.isabs(cell) else os.path.join(base, cell)
            prefix = _norm_path(path) + "["
            frames = [s for s in sources if _norm_path(s).startswith(prefix)]
            hint = (f"; the file holds several images: name one, e.g. {frames[0]}" if frames else
                    f"; it must be one of the --images (e.g. {', '.join(sources[:3])})")
            raise PairingError(f"{csv_path}, line {line}: {column} image {cell!r} ({path}) is not among the "
                               f"{len(sources)} images{hint}")
        return index

    pairs = []
    for line, fixed, moving in rows:
        if not fixed and not moving:
            continue
        if not fixed or not moving:
            raise PairingError(f"{csv_path}, line {line}: give both a fixed and a moving image")
        i, j = resolve(line, "fixed", fixed), resolve(line, "moving", moving)
        if i == j:
            raise PairingError(f"{csv_path}, line {line}: fixed and moving are the same image ({sources[i]}); "
                               "pair two different images")
        pairs.append((i, j))
    if not pairs:
        raise PairingError(f"{csv_path}: the pair list has no rows; add `fixed,moving` rows")
    return np.asarray(pairs, np.int64)


def split_within_groups(groups, fractions=(0.8, 0.1, 0.1)):
    """Split every group in time: its first images to train, the next to valid, the last to test.

    For a collection that is one sequence (e.g. the frames of one cine), where a split by
    group would put everything into train: each group, in its given order, is cut into
    three contiguous blocks of ``round(f * n)`` images (rounded half up for valid and test;
    train keeps the rest and at least one image), so that no frame is in two splits and the
    evaluation frames are later in time than the training frames.

    Parameters
    ----------
    groups : sequence ``[N]``
        Group of each image; ``None`` = ungrouped (such an image is a group of its own, and
        so goes to train, as in :func:`pair_candidates`).
    fractions : sequence of 3 float or str
        As for :func:`split_by_group`.

    Returns
    -------
    dict
        ``{"train", "valid", "test"}`` sorted int64 index arrays covering every image once.
    """
    fractions = parse_split(fractions) if isinstance(fractions, str) else _check_fractions(fractions)
    keys = [f"\0image {i}" if g is None or g == "" else str(g) for i, g in enumerate(groups)]
    if not keys:
        raise PairingError("no images to split")
    out = {name: [] for name in SPLIT_NAMES}
    for key in dict.fromkeys(keys):
        members = [i for i, k in enumerate(keys) if k == key]
        n = len(members)
        n_valid = int(np.floor(fractions[1] * n + 0.5))
        n_test = int(np.floor(fractions[2] * n + 0.5))
        while n_valid + n_test > n - 1 and n_valid + n_test > 0:
            if n_test >= n_valid:
                n_test -= 1
            else:
                n_valid -= 1
        n_train = n - n_valid - n_test
        out["train"] += members[:n_train]
        out["valid"] += members[n_train:n_train + n_valid]
        out["test"] += members[n_train + n_valid:]
    return {name: np.asarray(sorted(v), np.int64) for name, v in out.items()}
