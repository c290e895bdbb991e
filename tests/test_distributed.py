"""Two processes (torchrun, gloo on CPU) train a few steps; their OccamLoss states agree."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_gloo_training_keeps_occam_state_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(HERE, "ddp_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    a, b = states[0]["loss"], states[1]["loss"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in states[0]["params"]:  # BN running stats are per process, as in any DDP run
        assert torch.equal(states[0]["params"][name], states[1]["params"][name]), name
    # Each process saw different items; both hold targets for the union.
    items0, items1 = states[0]["items"], states[1]["items"]
    assert not set(items0.tolist()) & set(items1.tolist())
    union = torch.cat([items0, items1])
    assert a["has_target"][:, union].all()
    assert a["has_target"].sum(1).tolist() == [len(union)] * 4
