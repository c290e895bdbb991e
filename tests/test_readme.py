"""README.md's Python API block runs as written, on the names it leaves to the reader (a
batch, its labels and item indices, a CAM input, a training split, a run's checkpoint, an
official checkpoint). It did not: it used torchvision without importing it."""
import os

import torch
from torch import nn

from occamnets.cli import main
from occamnets.evaluate import load_model, load_splits
from test_official_weights import OfficialLayout

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_api_block() -> str:
    section = open(README).read().split("## Python API", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_python_api_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the block's relative paths: runs/occam, official.ckpt
    assert main(["train", "--out", "runs/occam", "--data-dir", "data", "--preset", "quick",
                 "--cell-size", "6", "--train-size", "64", "--val-size", "10",
                 "--test-size", "20", "--epochs", "1", "--batch-size", "32", "--width", "4",
                 "--device", "cpu", "--no-progress"]) == 0
    official = OfficialLayout(10).state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in official.items()}}, "official.ckpt")
    _, config = load_model("runs/occam/checkpoint.pt", "cpu")
    split = load_splits(config, "cpu", ["train"])["train"]
    item_indices = torch.arange(4)
    given = dict(h=torch.relu(torch.randn(4, 8, 5, 5)), conv=nn.Conv2d(8, 10, 1),
                 x=split.batch(item_indices), labels=split.labels[item_indices],
                 keep=torch.tensor([True, False, True, True]), item_indices=item_indices,
                 split=split, train_set=range(len(split)), epoch=0)
    scope = dict(given)
    exec(compile(python_api_block(), README, "exec"), scope)
    assert 0 <= scope["evaluation"].accuracy <= 1
    assert scope["x_kept"].shape[0] == 3 and scope["result"].exit_index.shape == (4,)
