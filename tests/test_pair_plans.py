"""dirnet_tf.pair_plans: pairing modes, splits by group, pair lists, evaluation pairs (numpy)."""

import numpy as np
import pytest

from dirnet_tf.pair_plans import (
    PairingError,
    evaluation_pairs,
    pair_candidates,
    parse_pairs_spec,
    parse_split,
    read_pair_list,
    split_by_group,
)
from dirnet_tf.readers import InputError


def _pairs(array):
    return {tuple(int(v) for v in row) for row in array}


def test_parse_pairs_spec():
    # catches: a mode table missing an entry, or atlas/list losing a path that contains ':'
    assert parse_pairs_spec("random") == ("random", None)
    assert parse_pairs_spec(" within_group ") == ("within_group", None)
    assert parse_pairs_spec("sequence") == ("sequence", None)
    assert parse_pairs_spec("atlas:atlases/mni.nii.gz") == ("atlas", "atlases/mni.nii.gz")
    assert parse_pairs_spec("list:C:/data/pairs.csv") == ("list", "C:/data/pairs.csv")


def test_within_group_pairs_by_hand():
    # catches: pairs across groups, self-pairs, a missing direction, groups keyed by position not value
    groups = ["a", "b", "a", "a", "b"]
    expected = {(0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2), (1, 4), (4, 1)}
    got = pair_candidates(groups, "within_group")
    assert got.dtype == np.int64 and got.shape == (8, 2)
    assert _pairs(got) == expected
    # integer groups (numpy) work the same; output is sorted by (fixed, moving)
    got = pair_candidates(np.array([7, 3, 7, 7, 3]), "within_group")
    assert got.tolist() == [list(p) for p in sorted(expected)]


def test_sequence_pairs_follow_group_order_and_gap():
    # catches: distance measured in collection indices (0 and 2 are consecutive frames of `a`),
    # one direction only, gap off by one, pairs across groups
    groups = ["a", "b", "a", "b", "a", "b", "a"]  # a = frames 0, 2, 4, 6; b = frames 1, 3, 5
    gap1 = {(0, 2), (2, 0), (2, 4), (4, 2), (4, 6), (6, 4), (1, 3), (3, 1), (3, 5), (5, 3)}
    assert _pairs(pair_candidates(groups, "sequence")) == gap1
    gap2 = gap1 | {(0, 4), (4, 0), (2, 6), (6, 2), (1, 5), (5, 1)}
    assert _pairs(pair_candidates(groups, "sequence", max_frame_gap=2)) == gap2
    # a gap larger than any group = within_group
    assert _pairs(pair_candidates(groups, "sequence", max_frame_gap=10)) == _pairs(
        pair_candidates(groups, "within_group"))


def test_atlas_pairs_by_hand():
    # catches: the atlas registered to itself, the atlas as moving image, the atlas lost when the
    # split (subset) does not hold it
    groups = [None, None, "g", "g"]
    assert pair_candidates(groups, "atlas", atlas_index=2).tolist() == [[2, 0], [2, 1], [2, 3]]
    assert pair_candidates(groups, "atlas", atlas_index=2, subset=[3, 0]).tolist() == [[2, 0], [2, 3]]


def test_list_pairs_keep_file_order_and_stay_in_the_split():
    # catches: list pairs re-sorted / de-duplicated, or pairs with an image outside the split kept
    groups = ["a", "a", "b", "b"]
    pairs = [[1, 0], [2, 3], [0, 2], [1, 0]]
    assert pair_candidates(groups, "list", pairs=pairs).tolist() == pairs
    assert pair_candidates(groups, "list", pairs=pairs, subset=[0, 1]).tolist() == [[1, 0], [1, 0]]
    with pytest.raises(PairingError, match="none of the 2 listed pairs has both images"):
        pair_candidates(groups, "list", pairs=[[0, 2], [3, 1]], subset=[0, 1])


def test_random_mode_and_its_evaluation_pairs():
    # catches: materialising N^2 pairs for random; evaluation pairs with self-pairs, duplicates,
    # images outside the split, or not reproducible per seed
    groups = [None] * 30
    assert pair_candidates(groups, "random") is None
    subset = np.arange(0, 30, 3)  # 10 images
    a = evaluation_pairs(groups, "random", subset=subset, seed=4)
    assert a.shape == (10, 2)  # default: one pair per image
    assert np.isin(a, subset).all() and (a[:, 0] != a[:, 1]).all()
    assert len(_pairs(a)) == 10
    np.testing.assert_array_equal(a, evaluation_pairs(groups, "random", subset=subset, seed=4))
    assert not np.array_equal(a, evaluation_pairs(groups, "random", subset=subset, seed=5))
    # asking for more than exist gives every ordered pair once
    every = evaluation_pairs(groups[:3], "random", max_pairs=100)
    assert _pairs(every) == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}


def test_evaluation_pairs_other_modes():
    # catches: the cap ignored, a sample that is not a subset of the candidates, or not seeded
    groups = ["a"] * 4 + ["b"] * 3
    full = pair_candidates(groups, "within_group")
    np.testing.assert_array_equal(evaluation_pairs(groups, "within_group"), full)
    capped = evaluation_pairs(groups, "within_group", max_pairs=5, seed=1)
    assert capped.shape == (5, 2) and _pairs(capped) <= _pairs(full)
    assert capped.tolist() == sorted(capped.tolist())  # candidate order kept
    np.testing.assert_array_equal(capped, evaluation_pairs(groups, "within_group", max_pairs=5, seed=1))
    assert not np.array_equal(capped, evaluation_pairs(groups, "within_group", max_pairs=5, seed=2))
    assert evaluation_pairs(groups, "atlas", atlas_index=0, subset=[4, 5]).tolist() == [[0, 4], [0, 5]]


# --------------------------------------------------------------------------- #
# Splits by group
# --------------------------------------------------------------------------- #


def _random_layout(rng):
    n_groups = int(rng.integers(20, 60))
    sizes = rng.integers(1, 6, n_groups)
    groups = [f"g{g}" for g, s in enumerate(sizes) for _ in range(s)]
    groups += [None] * int(rng.integers(0, 10))  # ungrouped images: one group each
    order = rng.permutation(len(groups))  # groups interleaved in the input
    return [groups[i] for i in order]


def test_split_by_group_on_random_layouts():
    # catches: frames of one group in two splits, images lost or duplicated, ungrouped images
    # lumped into one group, fractions applied to the wrong split, a split that ignores the seed
    for layout_seed in range(6):
        groups = _random_layout(np.random.default_rng(layout_seed))
        split = split_by_group(groups, (0.7, 0.2, 0.1), seed=layout_seed)
        everything = np.concatenate([split["train"], split["valid"], split["test"]])
        np.testing.assert_array_equal(np.sort(everything), np.arange(len(groups)))
        owner = {}
        for name, idx in split.items():
            assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
            for i in idx:
                key = groups[i] if groups[i] is not None else ("none", int(i))
                assert owner.setdefault(key, name) == name, f"group {key} in {owner[key]} and {name}"
        n_groups = len(owner)
        per_split = {name: sum(1 for s in owner.values() if s == name) for name in split}
        assert per_split["valid"] == int(np.floor(0.2 * n_groups + 0.5))
        assert per_split["test"] == int(np.floor(0.1 * n_groups + 0.5))
        again = split_by_group(groups, (0.7, 0.2, 0.1), seed=layout_seed)
        other = split_by_group(groups, (0.7, 0.2, 0.1), seed=layout_seed + 100)
        for name in split:
            np.testing.assert_array_equal(split[name], again[name])
        assert any(not np.array_equal(split[n], other[n]) for n in split)


def test_split_rounding_with_few_groups():
    # catches: an empty train split, valid/test left empty with >= 3 groups, a zero fraction
    # still getting a group, the string form parsed differently
    def sizes(n_groups, fractions):
        split = split_by_group([f"g{i}" for i in range(n_groups)], fractions, seed=0)
        return tuple(len(split[k]) for k in ("train", "valid", "test"))

    assert sizes(1, (0.8, 0.1, 0.1)) == (1, 0, 0)
    assert sizes(2, (0.8, 0.1, 0.1)) == (2, 0, 0)
    assert sizes(2, (0.5, 0.5, 0.0)) == (1, 1, 0)
    assert sizes(2, (0.1, 0.45, 0.45)) == (1, 1, 0)  # train keeps one; test gives back on a tie
    assert sizes(3, (0.8, 0.1, 0.1)) == (1, 1, 1)
    assert sizes(3, (0.9, 0.1, 0.0)) == (2, 1, 0)
    assert sizes(4, (0.1, 0.45, 0.45)) == (1, 2, 1)
    assert sizes(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert sizes(10, "0.8,0.1,0.1") == (8, 1, 1)
    assert sizes(10, (1, 0, 0)) == (10, 0, 0)
    assert parse_split("0.6, 0.2, 0.2") == (0.6, 0.2, 0.2)


# --------------------------------------------------------------------------- #
# Pair lists (list:CSV)
# --------------------------------------------------------------------------- #


def test_read_pair_list_paths_and_indices(tmp_path, monkeypatch):
    # catches: paths resolved against the current folder instead of the CSV's folder, frame
    # suffixes not matched, digits read as file names, columns taken by position not by name
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    sources = ["data/a.png", str(data / "b.png"), "data/cine.dcm[frame 0]", "data/cine.dcm[frame 1]"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pairs.csv").write_text(
        "note,Moving,Fixed\n"
        "x,../data/b.png,../data/a.png\n"
        "\n"
        f",{data / 'cine.dcm[frame 1]'},../data/cine.dcm[frame 0]\n"
        ",0,3\n",
        encoding="utf-8")
    pairs = read_pair_list(lists / "pairs.csv", sources)
    assert pairs.dtype == np.int64
    assert pairs.tolist() == [[0, 1], [2, 3], [3, 0]]


def test_read_pair_list_errors(tmp_path):
    # catches: unknown images silently dropped, messages without the file / line, a multi-frame
    # file named without its frame accepted as some frame
    sources = [str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "cine.dcm[frame 0]")]

    def check(text, pattern):
        path = tmp_path / "p.csv"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(PairingError, match=pattern):
            read_pair_list(path, sources)

    check("fixed,moving\na.png,c.png\n", r"p\.csv, line 2: moving image 'c\.png' .* is not among the 3 images")
    check("fixed,moving\na.png,b.png\ncine.dcm,a.png\n", r"line 3: fixed .*several images: name one, e\.g\. .*frame 0")
    check("fixed,moving\n0,7\n", r"line 2: moving index 7 is out of range; there are 3 images")
    check("fixed,moving\nb.png,1\n", r"line 2: fixed and moving are the same image")
    check("fixed,moving\na.png,\n", r"line 2: give both a fixed and a moving image")
    check("a.png,b.png\n", r"header row with `fixed` and `moving` columns")
    check("fixed,moving\n", r"has no rows")
    with pytest.raises(PairingError, match="cannot read the pair list"):
        read_pair_list(tmp_path / "missing.csv", sources)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_errors_are_value_errors_that_say_what_to_fix():
    # catches: errors of another type (a traceback instead of a message) or messages that
    # do not name the mode / group / files to fix
    assert issubclass(PairingError, InputError) and issubclass(PairingError, ValueError)
    with pytest.raises(PairingError, match="unknown pairing mode 'pairwise'; use one of random, within_group"):
        parse_pairs_spec("pairwise")
    with pytest.raises(PairingError, match="give the atlas image as --pairs=atlas:PATH"):
        parse_pairs_spec("atlas:")
    with pytest.raises(PairingError, match="mode 'random' takes no argument"):
        parse_pairs_spec("random:5")
    with pytest.raises(PairingError, match="unknown pairing mode 'cine'"):
        pair_candidates(["a", "a"], "cine")


def test_group_of_one_image_is_named_with_its_files():
    # catches: a singleton group silently dropped (its images never trained on), a message that
    # names neither the group nor the file
    groups = ["s1", "s1", "s2", None, "s1"]
    names = ["s1_t0.nii", "s1_t1.nii", "s2_t0.nii", "loose.png", "s1_t2.nii"]
    for mode in ("within_group", "sequence"):
        with pytest.raises(PairingError, match=r"2 group\(s\) have only one: group 's2': s2_t0\.nii; "
                                               r"loose\.png \(no group\)\. Give these images a group"):
            pair_candidates(groups, mode, names=names)
    # a split that holds only complete groups is fine
    assert len(pair_candidates(groups, "within_group", subset=[0, 1, 4])) == 6


def test_fewer_than_two_usable_images():
    # catches: a pair set built from one image (endless self-registration); the samplers: test_pairs.py
    with pytest.raises(PairingError, match=r"--pairs=random needs at least two usable images, got 1 \(only\.png\)"):
        pair_candidates(["a"], "random", names=["only.png"])
    with pytest.raises(PairingError, match="--pairs=within_group needs at least two usable images, got 0"):
        pair_candidates(["a", "a"], "within_group", subset=[])
    with pytest.raises(PairingError, match="needs at least one image besides the atlas atlas.nii"):
        pair_candidates(["a", "b"], "atlas", atlas_index=1, subset=[1], names=["x.nii", "atlas.nii"])


def test_bad_arguments():
    # catches: a missing atlas index or pair list turning into an IndexError, gap 0 giving no pairs
    with pytest.raises(PairingError, match=r"--pairs=atlas needs the atlas image's index in 0\.\.2, got None"):
        pair_candidates([None] * 3, "atlas")
    with pytest.raises(PairingError, match="--pairs=list needs the pairs"):
        pair_candidates([None] * 3, "list")
    with pytest.raises(PairingError, match=r"pair 1 \[0, 3\] names an image outside 0\.\.2"):
        pair_candidates([None] * 3, "list", pairs=[[0, 1], [0, 3]])
    with pytest.raises(PairingError, match="--max_frame_gap=0: give a whole number >= 1"):
        pair_candidates(["a", "a"], "sequence", max_frame_gap=0)
    with pytest.raises(PairingError, match="max_pairs=0"):
        evaluation_pairs(["a", "a"], "within_group", max_pairs=0)


@pytest.mark.parametrize("fractions, pattern", [
    ((0.8, 0.1, 0.2), r"--split=0\.8,0\.1,0\.2: the fractions sum to 1\.1, not 1"),
    ((0.0, 0.5, 0.5), r"the train fraction is 0, which leaves nothing to train on"),
    ((1.2, -0.1, -0.1), r"fractions cannot be negative"),
    ((0.9, 0.1), r"give three fractions TRAIN,VALID,TEST that sum to 1"),
    ("0.8;0.1;0.1", r"--split=0\.8;0\.1;0\.1: give three fractions"),
    ("0.8,0.1,x", r"give three fractions"),
])
def test_bad_split_fractions(fractions, pattern):
    # catches: a split silently renormalised or leaving train empty
    with pytest.raises(PairingError, match=pattern):
        split_by_group(["a", "b", "c"], fractions)


def test_split_of_nothing():
    # catches: an empty collection giving three empty splits instead of an error
    with pytest.raises(PairingError, match="no images to split"):
        split_by_group([], (0.8, 0.1, 0.1))
