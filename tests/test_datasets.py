"""The real-dataset loaders (COCO-on-Places, BAR, CelebA, a folder + CSV) on tiny fixtures
written in each one's own layout: what they find, the errors for a wrong directory, the
decoded-image cache, streaming, the augmentation, and the learning-rate schedule of the
official COCO-on-Places config."""
import csv
import os
import shutil

import numpy as np
import pytest
import torch

import dataset_fixtures as fixtures
from occamnets.config import RunConfig
from occamnets.data import catalog, image_cache
from occamnets.data.augment import random_crop_flip
from occamnets.data.check import check_dataset
from occamnets.data.image_cache import DecodeErrors, StreamingSplit, load_cached
from occamnets.data.index import DatasetLayoutError
from occamnets.data.loaders import DeviceSplit
from occamnets.data.real_splits import load_real_splits
from occamnets.evaluate import load_splits
from occamnets.train import lr_factor, make_optimizer, make_scheduler


def test_coco_on_places_splits_groups_and_pixels(roots):
    index = catalog.find("coco-on-places", roots["coco-on-places"])
    assert list(index.splits) == ["train", "validtest", "valsgtest", "valoodtest", "idtest",
                                  "sgtest", "oodtest"]
    assert index.class_names[:3] == ("boat", "airplane", "truck") and len(index.class_names) == 9
    train = index.split("train")
    assert len(train) == 36 and np.bincount(train.labels).tolist() == [4] * 9
    # g marks the objects off their class's background; they are the bias-conflicting ones.
    assert train.attributes[:, 0].tolist() == [int(i % 4 == 3) for i in range(36)]
    assert (train.aligned[:, 0] == (train.attributes[:, 0] == 0)).all()
    groups = torch.unique(torch.from_numpy(2 * train.labels + train.attributes[:, 0]))
    assert len(groups) == 18   # the official 2 * y + g
    # Off the class's background by construction, whatever g the file holds (valsgtest: 0).
    for split in ("sgtest", "valsgtest", "oodtest", "valoodtest"):
        assert (index.split(split).attributes == 1).all() and not index.split(split).aligned.any()
    # Pixels as the official loader makes them: (x * 255) truncated to uint8.
    import h5py
    with h5py.File(os.path.join(roots["coco-on-places"], "train.h5py")) as h5:
        expected = (h5["images"][5].transpose(1, 2, 0) * 255).astype(np.uint8)
    assert np.array_equal(train.images.read(5), expected)


def test_bar_classes_from_file_names(roots):
    index = catalog.find("bar", roots["bar"])
    assert index.class_names == ("climbing", "diving", "fishing", "pole vaulting", "racing",
                                 "throwing")
    test = index.split("test")
    assert len(index.split("train")) == 36 and len(test) == 12
    names = [os.path.basename(p) for p in test.images.paths]
    assert all(index.class_names[y] == n.split("_")[0] for y, n in zip(test.labels, names))
    assert "pole vaulting_7.jpg" in names and test.attributes.shape == (12, 0)
    spec = catalog.spec("bar")
    assert spec.val is None and spec.reported_splits(list(index.splits)) == ("test",)


def test_celeba_blond_hair_and_male(roots):
    index = catalog.find("celeba", roots["celeba"])
    assert [len(index.split(s)) for s in ("train", "val", "test")] == [40, 8, 8]
    train = index.split("train")
    numbers = [int(os.path.basename(p)[:6]) for p in train.images.paths]
    assert [(int(y), int(m)) for y, m in zip(train.labels, train.attributes[:, 0])] == [
        fixtures.celeba_values(n) for n in numbers]
    # Four groups, 2 * blond + male as GroupDRO numbers them, all present.
    assert len(set((2 * train.labels + train.attributes[:, 0]).tolist())) == 4
    assert index.split("test").images.read(0).shape == (218, 178, 3)


def test_folder_csv_labels_attributes_and_splits(roots):
    index = catalog.find("folder", roots["folder"], ["place"])
    assert index.class_names == ("cat", "dog") and index.attribute_names == ("place",)
    assert [len(index.split(s)) for s in ("train", "val", "test")] == [40, 8, 8]
    # Without --bias-columns: every other column with few values; an id column would make
    # every image its own group, so it is skipped (and said).
    default = catalog.find("folder", roots["folder"])
    assert default.attribute_names == ("place",) and default.skipped_columns == ("img_id",)
    assert "img_id" in check_dataset(default).to_markdown()
    assert catalog.find("folder", roots["folder"], ["img_id", "place"]).attribute_names == (
        "img_id", "place")


def test_folder_groups_are_named_by_the_csvs_values(roots, tmp_path):
    """A bias column of words (land, water) was reported by the codes it was given
    ("cat, place=0"): the names are kept and every report of groups uses them."""
    root = str(tmp_path / "f")
    shutil.copytree(roots["folder"], root)
    csv_path = os.path.join(root, "metadata.csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["place"] = ["land", "water"][int(row["place"])]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    index = catalog.find("folder", root)
    assert index.attribute_values == (("land", "water"),)
    want = {"cat, place=land", "cat, place=water", "dog, place=land", "dog, place=water"}
    for streamed in (False, True):
        split = load_real_splits("folder", root, ["test"], str(tmp_path / "cache"), 16, "cpu",
                                 limit_bytes=0 if streamed else 8e9)["test"]
        assert isinstance(split, StreamingSplit) == streamed
        names = set(split.groups.names(split.class_names))
        assert names <= want and len(names) == split.groups.count > 1
    assert "cat, place=water" in check_dataset(index).to_markdown()


def test_folder_csv_from_excel_and_bad_rows(roots, tmp_path):
    """A byte-order mark, spaces after commas and Windows line ends are read; a row with a
    missing value or another number of values is named by its line."""
    root = str(tmp_path / "f")
    shutil.copytree(roots["folder"], root)
    csv_path = os.path.join(root, "metadata.csv")
    lines = open(csv_path).read().splitlines()
    excel = ["\ufeff" + lines[0].replace(",", ", ")] + lines[1:]
    open(csv_path, "w", encoding="utf-8", newline="").write("\r\n".join(excel) + "\r\n")
    index = catalog.find("folder", root, ["place"])
    assert [len(index.split(s)) for s in ("train", "val", "test")] == [40, 8, 8]
    open(csv_path, "w").write("\n".join(lines[:3] + [lines[3].rsplit(",", 1)[0] + ","]) + "\n")
    with pytest.raises(DatasetLayoutError, match="line 4: no value for split"):
        catalog.find("folder", root, ["place"])
    open(csv_path, "w").write("\n".join(lines[:3] + [lines[3] + ",extra"]) + "\n")
    with pytest.raises(DatasetLayoutError, match="line 4: 6 values for 5 columns"):
        catalog.find("folder", root, ["place"])


def _split_of_each_image(index) -> dict:
    return {name: split for split in ("train", "val", "test")
            for name in index.split(split).images.names}


def test_folder_without_split_column_is_split_the_same_every_time(tmp_path):
    root = fixtures.write_folder(str(tmp_path / "f"), counts=(("all", 60),), with_split=False)
    csv_path = os.path.join(root, "metadata.csv")
    header, *rows = open(csv_path).read().splitlines()
    # The first 50 rows, as the dataset was; then the same rows reversed; then 10 more.
    open(csv_path, "w").write("\n".join([header] + rows[:50]) + "\n")
    first = catalog.find("folder", root, ["place"])
    again = catalog.find("folder", root, ["place"])
    assert [len(first.split(s)) for s in ("train", "val", "test")] == [40, 5, 5]
    assert all(first.split(s).images.names == again.split(s).images.names
               for s in ("train", "val", "test"))
    assert not set(first.split("train").images.names) & set(first.split("test").images.names)
    split_of = _split_of_each_image(first)
    open(csv_path, "w").write("\n".join([header] + rows[:50][::-1]) + "\n")
    assert _split_of_each_image(catalog.find("folder", root, ["place"])) == split_of
    open(csv_path, "w").write("\n".join([header] + rows) + "\n")
    grown = _split_of_each_image(catalog.find("folder", root, ["place"]))
    assert not [name for name, split in split_of.items()
                if split == "test" and grown[name] == "train"]


def test_folder_csv_refuses_an_image_in_train_and_another_split_or_with_two_labels(
        roots, tmp_path):
    root = str(tmp_path / "f")
    shutil.copytree(roots["folder"], root)
    csv_path = os.path.join(root, "metadata.csv")
    header, *rows = open(csv_path).read().splitlines()   # img_id,path,label,place,split
    test_row = next(r for r in rows if r.endswith(",test")).split(",")

    def write(*extra):
        open(csv_path, "w").write("\n".join([header] + rows + [",".join(e) for e in extra])
                                  + "\n")
    # Twice in its split (drawn twice), and in a further evaluation split (a hard subset of
    # test, named with a space): allowed.
    write(test_row, test_row[:4] + ["hard test"])
    index = catalog.find("folder", root, ["place"])
    assert len(index.split("test")) == 9 and len(index.split("hard test")) == 1
    write(test_row[:4] + ["train"])       # the test image again, for training
    with pytest.raises(DatasetLayoutError, match=f"lists {test_row[1]} in train "
                       rf"\(line {len(rows) + 2}\) and in test \(line \d+\)"):
        catalog.find("folder", root, ["place"])
    relabelled = test_row[:2] + ["dog" if test_row[2] == "cat" else "cat"] + test_row[3:]
    write(relabelled)
    with pytest.raises(DatasetLayoutError, match="with two labels"):
        catalog.find("folder", root, ["place"])
    # A split's name is a cache file's name: no path in it (this one wrote outside the cache).
    write(test_row[:1] + ["images/extra.png"] + test_row[2:4] + ["../escaped"])
    with pytest.raises(DatasetLayoutError, match=f"line {len(rows) + 2}: split '../escaped' "
                       "is not a name"):
        catalog.find("folder", root, ["place"])


def test_folder_csv_refuses_integer_labels_that_look_like_ids(roots, tmp_path):
    """Labels 17 and 4000 built a 4,001-class model for two classes, without a word."""
    root = str(tmp_path / "f")
    shutil.copytree(roots["folder"], root)
    csv_path = os.path.join(root, "metadata.csv")
    text = open(csv_path).read()
    open(csv_path, "w").write(text.replace(",cat,", ",17,").replace(",dog,", ",4000,"))
    with pytest.raises(DatasetLayoutError, match="integers up to 4000, and only 2 of those "
                       "4001 classes have images"):
        catalog.find("folder", root)
    # One class of three without images is a dataset's subset, not ids: read as it is.
    open(csv_path, "w").write(text.replace(",cat,", ",0,").replace(",dog,", ",2,"))
    assert catalog.find("folder", root).class_names == ("0", "1", "2")


def test_folder_csv_as_spreadsheets_and_celeba_write_it(roots, tmp_path):
    """A comma ending every line (an unnamed empty column), blank lines (the errors still
    name the file's line), a column with blanks (skipped, not refused) and -1/1 values."""
    root = str(tmp_path / "f")
    shutil.copytree(roots["folder"], root)
    csv_path = os.path.join(root, "metadata.csv")
    header, *rows = open(csv_path).read().splitlines()
    notes = ["" if i % 3 else "blurry" for i in range(len(rows))]
    sign = ["-1" if i % 2 else "1" for i in range(len(rows))]
    lines = [header + ",notes,smiling,"] + [f"{r},{n},{s}," for r, n, s in
                                            zip(rows, notes, sign)]
    open(csv_path, "w").write("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    index = catalog.find("folder", root)
    assert index.attribute_names == ("place", "smiling")
    assert index.skipped_columns == ("img_id", "notes")
    smiling = np.concatenate([index.split(s).attributes[:, 1]
                              for s in ("train", "val", "test")])
    assert sorted(set(smiling.tolist())) == [0, 1]
    assert (smiling == np.array([0 if v == "-1" else 1 for v in sign])).all()
    broken = lines[:3] + [""] + lines[3:]
    broken[5] = broken[5].replace(",cat,", ",,").replace(",dog,", ",,")   # the file's line 6
    open(csv_path, "w").write("\n".join(broken) + "\n")
    with pytest.raises(DatasetLayoutError, match="line 6: no value for label"):
        catalog.find("folder", root)


@pytest.mark.parametrize("name", list(fixtures.WRITERS))
def test_a_missing_directory_or_file_says_what_and_where_to_get_it(name, roots, tmp_path):
    with pytest.raises(DatasetLayoutError, match="is not a directory"):
        catalog.find(name, str(tmp_path / "nowhere"))
    broken = str(tmp_path / "broken")
    shutil.copytree(roots[name], broken)
    first = {"coco-on-places": "sgtest.h5py", "bar": "test", "celeba": "Eval",
             "folder": "metadata.csv"}[name]
    path = os.path.join(broken, first)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(DatasetLayoutError, match=f"missing {first}") as error:
        catalog.find(name, broken)
    assert catalog.spec(name).get_it.split()[0] in str(error.value)


def test_wrong_content_is_named(roots, tmp_path):
    bar_root = str(tmp_path / "bar")
    shutil.copytree(roots["bar"], bar_root)
    open(os.path.join(bar_root, "train", "skiing_1.jpg"), "wb").close()
    with pytest.raises(DatasetLayoutError, match="unknown classes 'skiing'"):
        catalog.find("bar", bar_root)
    celeba_root = str(tmp_path / "celeba")
    shutil.copytree(roots["celeba"], celeba_root)
    with open(os.path.join(celeba_root, "Eval", "list_eval_partition.txt"), "a") as handle:
        handle.write("000099.jpg 7\n")
    with pytest.raises(DatasetLayoutError, match=r"line 57: expected `<image id> 0\|1\|2`"):
        catalog.find("celeba", celeba_root)
    folder_root = str(tmp_path / "folder")
    shutil.copytree(roots["folder"], folder_root)
    with pytest.raises(DatasetLayoutError, match="no bias column colour"):
        catalog.find("folder", folder_root, ["colour"])
    csv_path = os.path.join(folder_root, "metadata.csv")
    lines = open(csv_path).read().splitlines()
    open(csv_path, "w").write("\n".join(l for l in lines if not l.endswith(",test")) + "\n")
    with pytest.raises(DatasetLayoutError, match="no image in the test split"):
        catalog.find("folder", folder_root, ["place"])
    with pytest.raises(ValueError, match="--bias-columns is for --dataset folder"):
        catalog.find("bar", roots["bar"], ["place"])


def test_cache_decodes_once_and_redecodes_a_damaged_split(roots, tmp_path, monkeypatch):
    index = catalog.find("bar", roots["bar"])
    directory = str(tmp_path / "cache")
    first = load_cached(index, ["train", "test"], directory, 16, None)
    assert first["train"].shape == (36, 3, 16, 16) and first["train"].dtype == torch.uint8
    expected, _ = image_cache.decode_positions(index.split("test").images, range(12), 16, None)
    assert torch.equal(first["test"], torch.from_numpy(expected))

    decoded = []
    real = image_cache._decode_split
    monkeypatch.setattr(image_cache, "_decode_split",
                        lambda name, *a, **k: decoded.append(name) or real(name, *a, **k))
    again = load_cached(index, ["train", "test"], directory, 16, None)
    assert decoded == [] and torch.equal(again["train"], first["train"])
    # A corrupted array is decoded again, alone; another size is another fingerprint.
    path = os.path.join(directory, "test_images.npy")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert "corrupt" in image_cache.cache_problem(
        directory, "test", image_cache.fingerprint(index.split("test"), 16, None))
    repaired = load_cached(index, ["train", "test"], directory, 16, None)
    assert decoded == ["test"] and torch.equal(repaired["test"], torch.from_numpy(expected))
    load_cached(index, ["test"], directory, 12, None)
    assert decoded == ["test", "test"]


def test_an_interrupted_decode_leaves_no_partial_cache(roots, tmp_path, monkeypatch):
    index = catalog.find("bar", roots["bar"])
    directory = str(tmp_path / "cache")
    calls = []

    def interrupted(image, size, crop):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return np.zeros((3, size, size), dtype=np.uint8)
    monkeypatch.setattr(image_cache, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_cached(index, ["train"], directory, 16, None, workers=1)
    assert os.listdir(directory) == []
    monkeypatch.undo()
    assert load_cached(index, ["train"], directory, 16, None)["train"].shape[0] == 36


def test_unreadable_images_are_named_and_checked(roots, tmp_path):
    root = str(tmp_path / "folder")
    shutil.copytree(roots["folder"], root)
    with open(os.path.join(root, "images", "0003.png"), "wb") as handle:
        handle.write(b"not a png")
    os.remove(os.path.join(root, "images", "0005.png"))
    index = catalog.find("folder", root, ["place"])
    with pytest.raises(DecodeErrors, match="2 image.* of the train split cannot be read"):
        load_cached(index, ["train"], str(tmp_path / "cache"), 16, None)
    assert not os.path.exists(str(tmp_path / "cache" / "train_images.npy"))
    result = check_dataset(index)
    train = result.splits[0]
    assert not result.ok and train.missing == [os.path.join(root, "images", "0005.png")]
    assert [os.path.basename(name) for name, _ in train.unreadable] == ["0003.png"]
    assert train.per_class == [20, 20] and sum(n for _, n in train.groups) == 40
    assert "missing" in result.to_markdown() and "0003.png" in result.to_markdown()


def test_streaming_gives_the_cached_batches(roots, tmp_path):
    cached = load_real_splits("celeba", roots["celeba"], ["train"], str(tmp_path / "c"), 24,
                              "cpu")["train"]
    streamed = load_real_splits("celeba", roots["celeba"], ["train"], str(tmp_path / "s"), 24,
                                "cpu", limit_bytes=0)["train"]
    assert isinstance(cached, DeviceSplit) and isinstance(streamed, StreamingSplit)
    assert not os.path.exists(str(tmp_path / "s"))
    rows = torch.tensor([3, 0, 17])
    assert torch.equal(streamed.batch(rows), cached.batch(rows))
    assert torch.equal(streamed.groups.index, cached.groups.index)
    assert streamed.groups.count == 4 and cached.class_names == ("not blond", "blond")


def test_celeba_images_are_centre_cropped_square(roots, tmp_path):
    split = load_real_splits("celeba", roots["celeba"], ["test"], str(tmp_path / "c"), 178,
                             "cpu")["test"]
    raw = catalog.find("celeba", roots["celeba"]).split("test").images.read(2)
    assert torch.equal(split.uint8(torch.tensor([2]))[0],
                       torch.from_numpy(raw[20:198].transpose(2, 0, 1).copy()))


def test_load_splits_for_a_run_reads_its_reported_splits(roots, tmp_path):
    config = RunConfig.from_preset("quick", dataset="coco-on-places",
                                   data_root=roots["coco-on-places"],
                                   data_dir=str(tmp_path / "cache"))
    splits = load_splits(config, "cpu")
    assert list(splits) == ["train", "sgtest", "valsgtest", "validtest", "valoodtest",
                            "idtest", "oodtest"]
    assert splits["train"].images.shape == (36, 3, 32, 32)
    with pytest.raises(ValueError, match="has no split 'val'"):
        load_splits(config, "cpu", ["val"])
    with pytest.raises(ValueError, match="needs its directory: --root DIR"):
        load_splits(RunConfig(dataset="bar"), "cpu")


def test_random_crop_flip_is_a_crop_of_the_padded_image_or_its_mirror():
    x = torch.rand(64, 3, 9, 7)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    again = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    flips = 0
    for i in range(64):
        crops = [padded[i, :, r:r + 9, c:c + 7] for r in range(5) for c in range(5)]
        plain = any(torch.equal(out[i], crop) for crop in crops)
        mirrored = any(torch.equal(out[i].flip(2), crop) for crop in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 15 < flips < 49   # about half
    assert not torch.equal(out, x)
    # No padding: only mirrors; the memory format is kept.
    same = random_crop_flip(x.contiguous(memory_format=torch.channels_last), 0,
                            torch.Generator().manual_seed(1))
    assert same.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(2)) for i in range(64))


def learning_rates(config):
    """The rate of every epoch as the trainer's scheduler sets it."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(config, [parameter])
    scheduler = make_scheduler(config, optimizer)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_official_coco_on_places_schedule():
    config = RunConfig.from_preset("paper", dataset="coco-on-places")
    rates = learning_rates(config)
    assert rates == pytest.approx([config.lr * lr_factor(config, e) for e in range(150)])
    # Warm-up (0.1 - 0.01) * (e + 1) / 5, then the milestones counted after the warm-up.
    assert rates[:5] == pytest.approx([0.018, 0.036, 0.054, 0.072, 0.09])
    assert rates[5] == rates[104] == pytest.approx(0.1)
    assert rates[105] == rates[124] == pytest.approx(0.01)
    assert rates[125] == pytest.approx(1e-3) and rates[149] == pytest.approx(1e-4)
    assert (config.optimizer, config.nesterov, config.width, config.stem, config.input_size) == (
        "sgd", True, 58, "3x3", 64)
    # Every quick preset's milestone is reached; a warm-up must start below lr.
    for name in ("coco-on-places", "bar"):
        assert learning_rates(RunConfig.from_preset("quick", dataset=name)) == pytest.approx(
            [0.04, 0.05, 0.005])
    with pytest.raises(ValueError, match="warmup_start_lr 0.2 must be below lr 0.1"):
        RunConfig.from_preset("paper", dataset="coco-on-places", warmup_start_lr=0.2)


def test_torchvision_jpeg_decoding_matches_pillow(roots, tmp_path):
    """The batched JPEG path (nvJPEG on a GPU; here libjpeg-turbo on the CPU, the same code):
    the same pixels as Pillow before resizing, within one level after; a broken file named."""
    split = catalog.find("celeba", roots["celeba"]).split("test")
    pil, _ = image_cache.decode_rows(split, range(8), 178, 178, None, "pil")
    batched, problems = image_cache.decode_rows(split, range(8), 178, 178, None, "torchvision")
    assert problems == [] and torch.equal(pil, batched)
    pil, _ = image_cache.decode_rows(split, range(8), 32, 178, None, "pil")
    batched, _ = image_cache.decode_rows(split, range(8), 32, 178, None, "torchvision")
    assert (pil.int() - batched.int()).abs().max() <= 1
    root = str(tmp_path / "celeba")
    shutil.copytree(roots["celeba"], root)
    broken = catalog.find("celeba", root).split("test")
    with open(broken.images.paths[3], "wb") as handle:
        handle.write(b"\xff\xd8 not really a jpeg")
    from PIL import Image
    Image.open(split.images.paths[5]).save(broken.images.paths[5], format="PNG")
    images, problems = image_cache.decode_rows(broken, range(8), 32, 178, None, "torchvision")
    assert [path for path, _ in problems] == [broken.images.paths[3]]
    assert torch.equal(images[:3], batched[:3]) and images[3].eq(0).all()
    # A PNG named .jpg: torchvision refuses it, Pillow reads it (as it would without it).
    assert torch.equal(images[5], pil[5])
    # The cache knows which decoder made an array: another one decodes again.
    index = catalog.find("celeba", roots["celeba"])
    directory = str(tmp_path / "cache")
    load_cached(index, ["test"], directory, 32, 178, decoder="torchvision")
    assert image_cache.cache_problem(directory, "test", image_cache.fingerprint(
        index.split("test"), 32, 178, "pil")) == "cached from other images or another size"
    streamed = load_real_splits("celeba", roots["celeba"], ["test"], directory, 32, "cpu",
                                limit_bytes=0, decoder="torchvision")["test"]
    assert torch.equal(streamed.uint8(torch.arange(8)), batched)


@pytest.mark.parametrize("name", ["coco-on-places", "folder"])
def test_a_source_file_rewritten_in_place_is_decoded_again(name, roots, tmp_path):
    """Same names, new content (an .h5py regenerated with the same counts, an image edited):
    the cached pixels would no longer match the labels read fresh, so they are decoded again."""
    root = str(tmp_path / name)
    shutil.copytree(roots[name], root)
    columns, split = (["place"], "test") if name == "folder" else (None, "idtest")
    index = catalog.find(name, root, columns)
    directory = str(tmp_path / "cache")
    first = load_cached(index, [split], directory, 16, None)[split].clone()
    changed = index.split(split).images.files[0]
    if name == "folder":
        from PIL import Image
        Image.new("RGB", (20, 20), (255, 255, 255)).save(changed)
    else:
        import h5py
        with h5py.File(changed, "r+") as h5:
            h5["images"][0] = np.ones((3, 16, 16), dtype=np.float32)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    again = load_cached(catalog.find(name, root, columns), [split], directory, 16, None)[split]
    assert not (first[0] == 255).all() and (again[0] == 255).all()


@pytest.mark.parametrize("name, split", [("coco-on-places", "train"), ("celeba", "train")])
def test_groups_are_numbered_as_the_official_code_numbers_them(name, split, roots, tmp_path):
    """COCO-on-Places's 2 * y + g and CelebA's 2 * blond + male: PGI reads the numbering
    (each class's first half against its second), so the order is the official one."""
    items = load_real_splits(name, roots[name], [split], str(tmp_path / "c"), 16, "cpu")[split]
    attribute = items.factors[:, 0]
    assert torch.equal(items.groups.index, 2 * items.labels + attribute)
    first = items.groups.names(items.class_names)[:2]
    assert first == (["boat, background=0", "boat, background=1"] if name == "coco-on-places"
                     else ["not blond, male=0", "not blond, male=1"])


def test_predict_prepares_image_files_as_the_training_images(roots, tmp_path):
    """CelebA's centre square, then the resize: the same pixels as the cached split."""
    from occamnets.data.loaders import read_image_batches
    split = load_real_splits("celeba", roots["celeba"], ["test"], str(tmp_path / "c"), 32,
                             "cpu")["test"]
    paths = catalog.find("celeba", roots["celeba"]).split("test").images.paths[:3]
    batches = list(read_image_batches(paths, 2, 32, catalog.spec("celeba").centre_crop))
    assert [[f.path for f in files] for files in batches] == [paths[:2], paths[2:]]
    files = batches[0] + batches[1]
    assert torch.equal(torch.stack([f.image for f in files]), split.uint8(torch.arange(3)))
    assert [f.size for f in files] == [(178, 218)] * 3


def test_augmentation_differs_per_process_and_step_and_repeats_on_resume():
    from occamnets.train import augmentation_seed
    seeds = {augmentation_seed(seed, step, rank)
             for seed in range(3) for step in range(100) for rank in range(8)}
    assert len(seeds) == 3 * 100 * 8 and augmentation_seed(1, 7, 2) == augmentation_seed(1, 7, 2)
    # The largest seed the config takes seeds a torch Generator (it refuses 2^63 and more).
    for step in (0, 10**7):
        torch.Generator().manual_seed(augmentation_seed(2**32 - 1, step, 7))


def _listed_twice(tmp_path, content):
    """A split of a readable JPEG and a file (`content(path)` writes it) listed twice."""
    from PIL import Image
    from occamnets.data.index import DatasetIndex, SplitIndex, file_source
    pixels = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "good.jpg", format="JPEG")
    content(tmp_path / "twice.jpg", pixels)
    paths = [str(tmp_path / n) for n in ("good.jpg", "twice.jpg", "good.jpg", "twice.jpg")]
    split = SplitIndex(file_source(paths), np.arange(4) % 2, np.zeros((4, 0), dtype=np.int64))
    return DatasetIndex("folder", str(tmp_path), ("a", "b"), (), {"train": split})


def test_a_png_named_jpg_listed_twice_is_read_by_pillow_in_both_rows(tmp_path):
    from PIL import Image
    index = _listed_twice(tmp_path, lambda path, pixels: Image.fromarray(pixels).save(
        path, format="PNG"))   # torchvision refuses it, Pillow reads it
    split = index.split("train")
    pil, _ = image_cache.decode_rows(split, range(4), 16, None, None, decoder="pil")
    images, problems = image_cache.decode_rows(split, range(4), 16, None, None,
                                               decoder="torchvision")
    assert problems == [] and pil[3].any()
    assert torch.equal(images[1], pil[1]) and torch.equal(images[3], pil[3])


def test_a_preview_leaves_out_every_row_of_an_unreadable_image_listed_twice(tmp_path):
    from occamnets.data.real_splits import first_images
    index = _listed_twice(tmp_path, lambda path, pixels: path.write_bytes(b"not an image"))
    with pytest.raises(DecodeErrors, match="2 image"):
        first_images(index, "train", 16, None, 4, workers=1)
    shown = first_images(index, "train", 16, None, 4, workers=1, skip_unreadable=True)
    assert len(shown) == 2 and shown.labels.tolist() == [0, 0]   # the good.jpg rows only


def test_an_hdf5_group_or_an_oversized_csv_value_is_a_layout_error(roots, tmp_path):
    import h5py
    coco_root = str(tmp_path / "coco")
    shutil.copytree(roots["coco-on-places"], coco_root)
    for key in ("images", "g"):
        path = os.path.join(coco_root, "train.h5py")
        shutil.copyfile(os.path.join(roots["coco-on-places"], "train.h5py"), path)
        with h5py.File(path, "a") as h5:
            del h5[key]
            h5.create_group(key)
        with pytest.raises(DatasetLayoutError, match=f"train.h5py: {key} is an HDF5 group, "
                                                     f"not a dataset"):
            catalog.find("coco-on-places", coco_root)
    folder_root = str(tmp_path / "folder")
    shutil.copytree(roots["folder"], folder_root)
    csv_path = os.path.join(folder_root, "metadata.csv")
    lines = open(csv_path).read().splitlines()
    lines[2] = lines[2] + "x" * 200_000   # over the csv module's field limit (131,072)
    open(csv_path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match="metadata.csv line 3 cannot be read as CSV "
                                                 r"\(field larger than field limit"):
        catalog.find("folder", folder_root)
    open(csv_path, "wb").write(b"path,label\na\xe9.png,0\n")   # Latin-1, not UTF-8
    with pytest.raises(DatasetLayoutError, match="metadata.csv is not UTF-8 text"):
        catalog.find("folder", folder_root)
