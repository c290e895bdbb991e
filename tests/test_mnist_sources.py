"""The MNIST and EMNIST IDX readers refuse damaged or wrong files with a ValueError that names
the file and the fix, never a raw gzip/numpy traceback or silently wrong labels."""
import gzip

import numpy as np
import pytest

from occamnets.data.mnist_sources import load_emnist_letters, load_mnist_idx, read_idx

from dataset_fixtures import idx_bytes, write_mnist


IMAGES = np.random.default_rng(0).integers(0, 256, (12, 28, 28)).astype(np.uint8)
LABELS = np.arange(12) % 10


def test_a_truncated_gz_is_a_value_error_naming_the_file(tmp_path):
    write_mnist(tmp_path, IMAGES, LABELS, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])            # an interrupted download
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is truncated or "
                                         r"corrupt .*download it again"):
        load_mnist_idx(str(tmp_path), "train")
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 40)          # gzip magic, garbage after it
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(str(path))


def test_truncated_or_padded_idx_bodies_are_refused(tmp_path):
    path = tmp_path / "x-idx1"
    data = idx_bytes(np.arange(10, dtype=">i4"), 0x0C)
    for body in (data[:-3], data + b"\x00", data[:6]):   # cut mid-value, padded, cut header
        path.write_bytes(body)
        with pytest.raises(ValueError, match=r"x-idx1 is truncated"):
            read_idx(str(path))
    path.write_bytes(data)
    assert read_idx(str(path)).tolist() == list(range(10))


def test_a_gzipped_file_without_the_suffix_is_read(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(LABELS.astype(np.uint8))))
    assert read_idx(str(path)).tolist() == LABELS.tolist()


def test_mnist_labels_outside_0_to_9_are_refused(tmp_path):
    write_mnist(tmp_path, IMAGES, np.where(LABELS == 3, 42, LABELS))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds labels 0\.\.42, "
                                         r"outside 0\.\.9"):
        load_mnist_idx(str(tmp_path), "train")


@pytest.mark.parametrize("images, labels, match", [
    (IMAGES[:, :, :27], LABELS, r"train-images-idx3-ubyte holds uint8 images of shape "
                                r"\(12, 28, 27\), not \(N, 28, 28\)"),
    (IMAGES[:, 0], LABELS, r"train-images-idx3-ubyte holds .* not \(N, 28, 28\)"),
    (IMAGES, LABELS[:11], r"train-labels-idx1-ubyte has 11 labels but "
                          r".*train-images-idx3-ubyte has 12 images"),
    (IMAGES, LABELS.reshape(3, 4), r"train-labels-idx1-ubyte holds .* not one integer label"),
])
def test_mnist_files_of_the_wrong_shape_are_refused(tmp_path, images, labels, match):
    write_mnist(tmp_path, images, labels)
    with pytest.raises(ValueError, match=match):
        load_mnist_idx(str(tmp_path), "train")


def test_mnist_images_of_another_type_are_refused_not_wrapped(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        idx_bytes(IMAGES.astype(">i4") * 300, 0x0C))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(LABELS.astype(np.uint8)))
    with pytest.raises(ValueError, match=r"holds >i4 images .* not \(N, 28, 28\) uint8"):
        load_mnist_idx(str(tmp_path), "train")


def write_emnist(directory, labels):
    images = np.random.default_rng(1).integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
    (directory / "emnist-letters-train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (directory / "emnist-letters-train-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.asarray(labels, dtype=np.uint8)))


def test_emnist_letters_are_labelled_1_to_26(tmp_path):
    write_emnist(tmp_path, np.arange(52) % 26 + 1)
    glyphs = load_emnist_letters(str(tmp_path), 6, 2, seed=0)
    assert glyphs.shape == (26, 2, 6, 6) and glyphs.dtype == np.uint8
    write_emnist(tmp_path, np.arange(52) % 26)              # 0..25: the digits' convention
    with pytest.raises(ValueError, match=r"emnist-letters-train-labels-idx1-ubyte holds "
                                         r"labels 0\.\.25, outside 1\.\.26"):
        load_emnist_letters(str(tmp_path), 6, 2, seed=0)
    write_emnist(tmp_path, np.arange(52) % 25 + 1)          # no Z
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte has no images of the letters Z"):
        load_emnist_letters(str(tmp_path), 6, 2, seed=0)
