"""Tiny datasets written in each real dataset's own on-disk layout (see occamnets/data/), for
the loader, cache, check and CLI tests. Each image is a flat colour per class with a
per-image patch, so that classes are learnable and images differ."""
import csv
import gzip
import os

import numpy as np
from PIL import Image

from occamnets.data import bar, celeba, coco_on_places


def idx_bytes(array, type_code=0x08) -> bytes:
    """`array` in MNIST's IDX format: a 4-byte magic (element type, dimensions), big-endian
    sizes, then the elements as `array` holds them."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def write_mnist(directory, images, labels, compress=False, split_prefix="train"):
    """One MNIST split's image and label files (LeCun's names; "t10k" for the test split)."""
    suffix = ".gz" if compress else ""
    for name, array in ((f"{split_prefix}-images-idx3-ubyte", images),
                        (f"{split_prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(np.asarray(array, dtype=np.uint8))
        (directory / (name + suffix)).write_bytes(gzip.compress(data) if compress else data)


def _image(label: int, item: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * label + item)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = ((37 * label) % 256, (91 * label + 40) % 256, (53 * label + 90) % 256)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top:top + height // 3, left:left + width // 3] = rng.integers(0, 256, 3)
    return image


def write_coco_on_places(root, per_class=4, eval_per_class=4, side=16):
    """The seven labelled .h5py splits: train with g (a quarter of each class off its
    background), idtest/validtest with g, valsgtest with g all 0 and valoodtest all 1 (as the
    data maker writes them), sgtest and oodtest without g."""
    import h5py
    os.makedirs(root, exist_ok=True)
    classes = len(coco_on_places.CLASSES)
    for split in coco_on_places.SPLITS:
        count = per_class if split == "train" else eval_per_class
        labels = np.repeat(np.arange(classes), count)
        images = np.stack([_image(y, i, side, side) for i, y in enumerate(labels)])
        with h5py.File(os.path.join(root, f"{split}.h5py"), "w") as h5:
            # float in [0, 1] as the maker writes; +0.5 so truncation gives the uint8 back
            h5["images"] = ((images.astype(np.float32) + 0.5) / 255).transpose(0, 3, 1, 2)
            h5["y"] = labels.astype(np.int32)
            if split in ("train", "idtest", "validtest"):
                h5["g"] = (np.arange(len(labels)) % 4 == 3).astype(np.int32)
            elif split == "valsgtest":
                h5["g"] = np.zeros(len(labels), dtype=np.int32)
            elif split == "valoodtest":
                h5["g"] = np.ones(len(labels), dtype=np.int32)
    return str(root)


def write_bar(root, train_per_class=6, test_per_class=2, side=24):
    """train/ and test/ of <class>_<n>.jpg, n running per class across both folders."""
    for split, count, offset in (("train", train_per_class, 0),
                                 ("test", test_per_class, train_per_class)):
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        for label, name in enumerate(bar.CLASSES):
            for n in range(offset, offset + count):
                Image.fromarray(_image(label, n, side, side + 6)).save(
                    os.path.join(folder, f"{name}_{n}.jpg"), quality=95)
    return str(root)


# CelebA's 40 attributes, in the order of list_attr_celeba.txt.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()


def celeba_values(number: int):
    """(blond, male) of image `number` (1-based): every combination, in turn."""
    return (number // 2) % 2, number % 2


def write_celeba(root, counts=(40, 8, 8), width=178, height=218):
    """Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt and the aligned JPEGs."""
    image_dir = os.path.join(root, celeba.IMAGE_DIR)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "Anno"), exist_ok=True)
    os.makedirs(os.path.join(root, "Eval"), exist_ok=True)
    total = sum(counts)
    blond, male = CELEBA_ATTRIBUTES.index("Blond_Hair"), CELEBA_ATTRIBUTES.index("Male")
    attribute_lines, partition_lines = [str(total), " ".join(CELEBA_ATTRIBUTES)], []
    partition = np.repeat(np.arange(3), counts)
    for number in range(1, total + 1):
        image_id = f"{number:06d}.jpg"
        values = ["-1"] * len(CELEBA_ATTRIBUTES)
        is_blond, is_male = celeba_values(number)
        values[blond], values[male] = ("1" if is_blond else "-1"), ("1" if is_male else "-1")
        attribute_lines.append(f"{image_id} " + " ".join(f"{v:>2}" for v in values))
        partition_lines.append(f"{image_id} {partition[number - 1]}")
        Image.fromarray(_image(is_blond, number, height, width)).save(
            os.path.join(image_dir, image_id), quality=95)
    with open(os.path.join(root, celeba.ATTRIBUTES_FILE), "w") as handle:
        handle.write("\n".join(attribute_lines) + "\n")
    with open(os.path.join(root, celeba.PARTITION_FILE), "w") as handle:
        handle.write("\n".join(partition_lines) + "\n")
    return str(root)


def write_folder(root, counts=(("train", 40), ("val", 8), ("test", 8)), classes=2,
                 with_split=True, side=20):
    """images/<n>.png and metadata.csv: path, label (names), split, place (a bias attribute
    tied to the label 3 times in 4) and an id column."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows, n = [], 0
    for split, count in counts:
        for i in range(count):
            label = n % classes
            place = label if i % 4 else (label + 1) % classes
            name = os.path.join("images", f"{n:04d}.png")
            Image.fromarray(_image(label, n, side, side)).save(os.path.join(root, name))
            row = {"img_id": n, "path": name, "label": ["cat", "dog", "cow"][label],
                   "place": place}
            if with_split:
                row["split"] = split
            rows.append(row)
            n += 1
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(root)


WRITERS = {"coco-on-places": write_coco_on_places, "bar": write_bar, "celeba": write_celeba,
           "folder": write_folder}


def write_all(base) -> dict:
    """Every fixture under `base`: {dataset name: its root}."""
    return {name: write(os.path.join(str(base), name)) for name, write in WRITERS.items()}
