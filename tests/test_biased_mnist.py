"""Biased MNIST (DESIGN.md section 7): factor statistics, the unbiased test set, determinism,
the cache, the digit sources and the errors."""
import gzip
import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from occamnets.data import biased_mnist as bm
from occamnets.data.loaders import DeviceSplit, read_images
from occamnets.data.mnist_sources import load_digits, load_mnist_idx, read_idx

SMALL = dict(cell_size=6, train_size=300, val_size=50, test_size=200)


@pytest.mark.parametrize("p_bias", [0.95, 0.5])
def test_tied_fraction_per_factor_is_p_bias(p_bias):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    factors = bm.sample_factors(labels, {n: p_bias for n in bm.FACTOR_NAMES}, rng)
    for column, name in enumerate(bm.FACTOR_NAMES):
        tied = (factors[:, column] == labels).mean()
        assert abs(tied - p_bias) < 0.03, (name, tied)
        # The untied values spread over the nine others.
        others = factors[factors[:, column] != labels, column] - labels[factors[:, column] != labels]
        assert len(np.unique(others % 10)) == 9


@pytest.fixture(scope="module")
def splits():
    return bm.generate(bm.BiasedMNISTConfig(p_bias=0.5, **SMALL))


def test_generated_split_records_factors_and_follows_p_bias(splits):
    train = splits["train"]
    assert train.images.shape == (300, 3, 30, 30) and train.images.dtype == torch.uint8
    assert train.factors.shape == (300, 7) and train.factor_names == bm.FACTOR_NAMES
    tied = (train.factors == train.labels[:, None]).float().mean().item()
    assert abs(tied - 0.5) < 0.05      # 2,100 factor draws


def test_test_set_is_uniform_over_every_factor():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 3000)
    factors = bm.sample_factors(labels, {n: bm.UNBIASED for n in bm.FACTOR_NAMES}, rng)
    for column, name in enumerate(bm.FACTOR_NAMES):
        counts = np.bincount(factors[:, column], minlength=10)
        assert chisquare(counts).pvalue > 1e-3, (name, counts)
        joint = np.bincount(factors[:, column] * 10 + labels, minlength=100).reshape(10, 10)
        tied_share = np.trace(joint) / joint.sum()
        assert abs(tied_share - 0.1) < 0.02, name


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


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_directory(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 255, (12, 28, 28))
    labels = np.arange(12) % 10
    suffix = ".gz" if compress else ""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
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
    read = read_images([str(path)], 30)
    assert read.dtype == torch.uint8 and torch.equal(read[0], train.images[7])
    assert read_images([str(path)], 12).shape == (1, 3, 12, 12)
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*not_an_image.png as an image"):
        read_images([str(tmp_path / "not_an_image.png")], 12)


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
