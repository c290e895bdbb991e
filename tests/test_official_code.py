"""bench/official_code.py imports the official code from a checkout, with stand-ins for the
packages only its tools use. CI has no checkout, so a fake one with the same imports stands in
(in a child process: the stand-ins are process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_TRAINER = '''
import pytorch_lightning as pl
import cv2
from netcal.metrics import ECE
from sklearn.metrics import confusion_matrix


class OccamTrainer(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        self.log("loss", 0.0)
        scale = self.trainer_cfg.cam_suppression.loss_wt * (1 + self.current_epoch)
        return self.model(batch["x"]).sum() * scale
'''

DRIVER = '''
import sys, types, torch
sys.path.insert(0, {bench!r})
from official_code import official_training_step
model = torch.nn.Linear(3, 2)
model.multi_exit = types.SimpleNamespace(exit_block_nums=[0, 1, 2, 3])
step = official_training_step({checkout!r}, model)
x = torch.ones(5, 3)
loss = step.training_step({{"x": x}}, 0)
assert torch.allclose(loss, model(x).sum() * 0.1), loss
step.current_epoch = 1
assert torch.allclose(step.training_step({{"x": x}}, 1), model(x).sum() * 0.2)
assert step.num_exits == 4 and step.model is model
assert sum(p.numel() for p in step.parameters()) == 8   # the model's, registered
print("ok")
'''


def test_the_official_trainer_runs_with_stand_ins_for_its_tool_imports(tmp_path):
    checkout = tmp_path / "occam-nets-v1"
    (checkout / "models").mkdir(parents=True)
    (checkout / "trainers").mkdir()
    (checkout / "models" / "occam_resnet.py").write_text("")
    (checkout / "trainers" / "occam_trainer.py").write_text(FAKE_TRAINER)
    script = DRIVER.format(bench=os.path.join(ROOT, "bench"), checkout=str(checkout))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_folder_that_is_not_the_official_checkout_is_refused(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from official_code import import_official
    with pytest.raises(FileNotFoundError, match="not a checkout of erobic/occam-nets-v1"):
        import_official(str(tmp_path), "models.occam_resnet")
