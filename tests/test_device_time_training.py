"""bench/device_time.py's training part: our training step beside the official code's, and the
two probes of our bf16 step (issue 16's training target, bench/NOTES.md). CI has no official
checkout, so a fake one stands in (in a child process: official_code's stand-ins for the
official code's imports are process-wide)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from device_time import ALIGNED_WIDTH, OFFICIAL, cases  # noqa: E402

FAKE_MODEL = '''
import types
import torch


def occam_resnet18_img64(num_classes, width, exits_kwargs):
    model = torch.nn.Conv2d(3, num_classes, 3)
    model.multi_exit = types.SimpleNamespace(exit_block_nums=[0, 1, 2, 3])
    return model
'''

FAKE_TRAINER = '''
import pytorch_lightning as pl


class OccamTrainer(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        assert batch["x"].shape[0] == batch["y"].shape[0] == batch["item_ix"].shape[0]
        return self.model(batch["x"]).square().mean() * (1 + self.current_epoch)
'''

DRIVER = '''
import json, sys
from dataclasses import asdict
import torch
sys.path.insert(0, {bench!r})
from device_time import OFFICIAL, Case, Settings, time_case
settings = Settings(True, 2, 1, 2, 8, 10, 0.5, training_calls=2)
case = Case("training", OFFICIAL, (3, 16, 16), "bf16", "contiguous")
print(json.dumps(asdict(time_case(case, settings, torch.device("cpu"), 0.0))))
'''


def test_the_training_part_times_ours_then_the_official_then_the_probes():
    chosen = [(c.impl, c.dtype, c.width, c.cudnn_benchmark) for c in cases(["training"])]
    assert chosen == [("fused", "bf16", None, False), (OFFICIAL, "bf16", None, False),
                      ("fused", "fp32", None, False), (OFFICIAL, "fp32", None, False),
                      ("fused", "bf16", ALIGNED_WIDTH, False), ("fused", "bf16", None, True)]
    assert ALIGNED_WIDTH % 8 == 0
    without = [c.impl for c in cases(["training"], official=False)]
    assert OFFICIAL not in without and len(without) == 4
    # After the compaction and before the backward candidate: a timeout cuts the end.
    parts = [c.part for c in cases(["exit_head", "compact", "training", "backward"])]
    assert parts.index("training") > max(i for i, p in enumerate(parts) if p == "compact")
    assert parts.index("backward") > max(i for i, p in enumerate(parts) if p == "training")


def test_the_official_step_is_timed_from_a_checkout(tmp_path):
    checkout = tmp_path / "occam-nets-v1"
    (checkout / "models").mkdir(parents=True)
    (checkout / "trainers").mkdir()
    (checkout / "models" / "occam_resnet.py").write_text(FAKE_MODEL)
    (checkout / "trainers" / "occam_trainer.py").write_text(FAKE_TRAINER)
    script = DRIVER.format(bench=os.path.join(ROOT, "bench"))
    env = {**os.environ, "OCCAM_OFFICIAL": str(checkout)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300, cwd=os.path.join(ROOT, "bench"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    assert timing["part"] == "training" and timing["impl"] == OFFICIAL
    assert timing["stream_us"] > 0 and timing["wall_us"] > 0
    assert timing["shape"][1:] == [3, 16, 16] and timing["width"] == 4
    # No graph: Adam's step counts live on the host. Nothing else failed.
    assert set(timing["errors"]) == {"graph"}, timing["errors"]
    assert "Adam keeps its step counts on the host" in timing["errors"]["graph"]


def test_without_a_checkout_the_official_step_says_why(monkeypatch):
    from device_time import Case, Settings, time_case
    monkeypatch.delenv("OCCAM_OFFICIAL", raising=False)
    case = Case("training", OFFICIAL, (3, 16, 16), "bf16", "contiguous")
    with pytest.raises(RuntimeError, match="set OCCAM_OFFICIAL"):
        time_case(case, Settings(True, 2, 1, 2, 8, 10, 0.5, 2), torch.device("cpu"), 0.0)
