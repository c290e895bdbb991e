"""Run by tests/test_distributed.py under torchrun: GroupDRO's loss on each process's half of
a batch, gradients averaged as DDP averages them, must equal the loss and gradient of one
process holding the whole batch (group 2 is on the first process only)."""
import sys

import torch
import torch.distributed as dist

from occamnets.methods import GroupDRO


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0, 1.5])
    groups = torch.tensor([0, 2, 1, 0, 1, 1])
    half = len(losses) // world
    mine = slice(rank * half, (rank + 1) * half)

    local = losses[mine].clone().requires_grad_()
    distributed = GroupDRO(num_groups=3, eta=0.5)
    loss = distributed.reduce(local, groups[mine], 0)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    total /= world

    whole = losses.clone().requires_grad_()
    alone = GroupDRO(num_groups=3, eta=0.5)
    expected = alone.reduce(whole, groups, 0)
    expected.backward()
    # DDP divides the sum of the processes' gradients by their number: a sample's share of
    # the parameters' gradient is its loss gradient here / world. It must be the same as the
    # single process's.
    gathered = [torch.empty_like(local.grad) for _ in range(world)]
    dist.all_gather(gathered, local.grad / world)
    assert torch.allclose(torch.cat(gathered), whole.grad), (gathered, whole.grad)
    assert torch.allclose(total, expected.detach()), (total, expected)
    assert torch.allclose(distributed.group_weights, alone.group_weights)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.exit(0)
