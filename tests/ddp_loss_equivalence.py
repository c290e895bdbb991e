"""Run by tests/test_distributed.py under torchrun: OccamLoss (and each method's loss and
penalty) on each process's half of a batch, gradients averaged as DDP averages them, must equal
one process holding the whole batch. The halves differ on purpose: every exit right on the
first process, mostly wrong on the second (the gate's exit/continue balance), a class whose
groups lie on different processes (PGI's halves), and two items drawn on both processes (as
balanced sampling draws with replacement): the stored gate target is the second process's
copy, the last in the global batch."""
import sys

import torch
import torch.distributed as dist

from occamnets.losses import OccamLoss
from occamnets.methods import GroupDRO, PredictiveGroupInvariance
from occamnets.models.outputs import ExitOutput, OccamOutput

BATCH, CLASSES, EXITS, GROUPS = 8, 3, 2, 6
ITEMS = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])   # items 0 and 1 on both processes


def inputs():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = torch.randn(EXITS, BATCH, CLASSES, generator=generator)
    logits[:, torch.arange(BATCH // 2), labels[:BATCH // 2]] += 5
    gate_logits = torch.randn(EXITS, BATCH, generator=generator)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 5, 3])
    return labels, logits, gate_logits, groups


def step(method_name, rows):
    """Loss (with the penalty), parts and gradients of logits and gate logits on `rows`."""
    labels, logits, gate_logits, groups = inputs()
    labels, groups = labels[rows], groups[rows]
    logits = logits[:, rows].clone().requires_grad_()
    gate_logits = gate_logits[:, rows].clone().requires_grad_()
    method = {"erm": lambda: None, "gdro": lambda: GroupDRO(GROUPS, 0.5, EXITS),
              "pgi": lambda: PredictiveGroupInvariance(1.0, GROUPS, CLASSES, EXITS)}[method_name]()
    objective = OccamLoss(BATCH, CLASSES, num_exits=EXITS, taus=(0.5, 0.6), method=method)
    objective.on_epoch_start(0)
    exits = tuple(ExitOutput(logits[t], torch.sigmoid(gate_logits[t]), gate_logits[t], None,
                             torch.zeros(len(rows)), None) for t in range(EXITS))
    loss, parts = objective(OccamOutput(exits), labels, ITEMS[rows], groups)
    if method_name == "pgi":
        loss = loss + method.penalty(logits, labels, groups, 1.0).sum()
    loss.backward()
    return loss.detach(), parts, logits.grad, gate_logits.grad, objective.state_dict()


def gathered(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=1)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    half = BATCH // world
    shared = {}
    for name in ("erm", "gdro", "pgi"):
        loss, parts, logit_grad, gate_grad, state = step(
            name, torch.arange(rank * half, (rank + 1) * half))
        dist.all_reduce(loss)
        # DDP divides the processes' summed gradients by their number.
        shared[name] = (loss / world, parts, gathered(logit_grad / world),
                        gathered(gate_grad / world), state)
    dist.destroy_process_group()   # the reference: one process, no group
    for name, (loss, parts, logit_grad, gate_grad, state) in shared.items():
        whole_loss, whole_parts, whole_logit_grad, whole_gate_grad, whole_state = step(
            name, torch.arange(BATCH))
        assert torch.allclose(loss, whole_loss, atol=1e-6), (name, loss, whole_loss)
        assert torch.allclose(logit_grad, whole_logit_grad, atol=1e-6), name
        assert torch.allclose(gate_grad, whole_gate_grad, atol=1e-6), (
            name, gate_grad, whole_gate_grad)
        for part in ("exit_targets/E0", "exit_targets/E1", "train_acc/E0"):
            assert torch.allclose(parts[part].double(), whole_parts[part].double()), (
                name, part, parts[part], whole_parts[part])
        for key in whole_state:
            assert torch.allclose(state[key].double(), whole_state[key].double()), (name, key)
        # Items 0 and 1 keep their last copies' targets: positions 6 and 7's correctness.
        labels, logits, _, _ = inputs()
        last = (logits[:, 6:8].argmax(-1) == labels[6:8]).float()
        assert torch.equal(state["gate_targets"][:, :2], last), (name, state["gate_targets"])
        assert not torch.equal(last, torch.ones_like(last))   # the first copies' (right) differ
    print(f"process {rank}: the whole batch's loss, gradients and state")


if __name__ == "__main__":
    main()
    sys.exit(0)
