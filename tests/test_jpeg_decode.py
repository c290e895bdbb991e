"""occamnets.data.jpeg_decode: a batch of JPEGs of mixed sizes decodes to the same pixels, in
the same rows, as each file decoded alone (crops of one shape are resized together)."""
import numpy as np
import pytest
import torch
from PIL import Image

from occamnets.data.jpeg_decode import decode_jpeg_rows


@pytest.mark.parametrize("centre_crop", [None, 20])
def test_a_mixed_batch_equals_each_image_decoded_alone(tmp_path, centre_crop):
    rng = np.random.default_rng(0)
    paths = []
    # two shapes interleaved, one already at the output size, one unreadable file
    for i, (height, width) in enumerate([(30, 40), (24, 24), (30, 40), (16, 16), (24, 24)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    batch, problems = decode_jpeg_rows(paths, 16, centre_crop, "cpu")
    assert [row for row, _ in problems] == [2]
    assert batch.shape == (6, 3, 16, 16) and not batch[2].any()
    for row, path in enumerate(paths):
        if row == 2:
            continue
        alone, _ = decode_jpeg_rows([path], 16, centre_crop, "cpu")
        assert torch.equal(batch[row], alone[0]), row
    assert not torch.equal(batch[0], batch[1])
