"""OccamNet training losses with the official semantics (DESIGN.md section 5).

Per exit t, each averaged over the batch:
  supp_t: CAM suppression, weight 0.1;
  gate_t: balanced BCE of the exit gate against "exit t predicts correctly", weight 1.0,
          taken from the gate's fp32 logit (as the official, which inverts the sigmoid);
  main_t: mean((w + 0.1) * CE); w = p(y|x)^3 at t=0, (1 - gate_{t-1}) later (detached),
          divided by (running max of w within the epoch + 1e-5).
Beside the loss parts, forward reports the gate's state per exit for the training logs (device
tensors, read every log_every steps with the parts): "train_acc/Et", the epoch's running mean
per-class training accuracy that the refresh rule compares with tau_t; "exit_targets/Et",
the share of the batch whose gate target says "exit"; "refreshing/Et", true (1 in the logs)
when the targets were taken from this batch's predictions, false (0) when stored ones were
used; "gate_open/Et", the share of the batch whose gate is >= 0.5 (where inference leaves).
A debiasing method (occamnets/methods) replaces CE by its per-sample loss and the mean by its
reduction, as the official Occam trainers' `compute_main_loss`; the seed's ablation without
the output predictor's weighting (exit_weighting=False) drops (w + 0.1): the plain method loss.
The per-item gate targets, running maxima and per-class accuracy within the epoch are device
tensors updated with vectorised ops: no Python loop over samples, no host sync per step. The
per-class accuracy and the taus are float64, as the official Python floats are, and the
per-class accuracies are summed in the order the classes were first seen in the epoch, as the
official's dict keeps them: the refresh rule decides a tie (accuracy == tau) to the last bit
as the official does (tests/test_loss_parity.py).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .methods import Method
from .methods.method import in_process_group
from .models.outputs import OccamOutput


def _all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _last_copy(items: Tensor, num_items: int) -> Tensor:
    """(B,) long: for each position of `items` (B,), indices below num_items, the position of
    its item's last copy (itself for an item there once). Balanced sampling draws with
    replacement, so a batch may hold an item twice; the official stores the last copy's gate
    target (a dict written in batch order), while a scatter of every copy would keep whichever
    write the device did last. Writing the last copy's value at every copy's position is the
    same on any device (a maximum does not depend on the order it is taken in)."""
    positions = torch.arange(items.shape[0], device=items.device)
    last = items.new_zeros(num_items).scatter_reduce_(0, items, positions, "amax",
                                                      include_self=False)
    return last[items]


DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8)
LOSS_PARTS = ("supp", "gate", "main")  # summed into the loss, per exit
GATE_STATE_PARTS = ("train_acc", "exit_targets", "refreshing", "gate_open")  # logged only
# Under torch.distributed these are means over a process's own samples; the other parts (the
# rest of the gate state, a method's penalty) are the global batch's on every process.
PER_PROCESS_PARTS = LOSS_PARTS + ("gate_open",)


class OccamLoss(nn.Module):
    """Total OccamNet loss and its per-exit components ("supp/E0", "gate/E0", "main/E0", ...),
    with the gate's state per exit beside them (GATE_STATE_PARTS: for the logs, not summed).

    Args:
        num_items: size of the training set; item indices index the stored gate targets.
        num_classes: K.
        num_exits: exits of the model.
        taus: per exit, the mean per-class training accuracy within the epoch at or below which
            gate targets are refreshed (always in the first `min_epochs` epochs).
        method: the debiasing method shaping each exit's main loss (None: ERM, cross-entropy);
            its state is part of this module's.
        exit_weighting: False for the ablation without the output predictor's weighting: every
            sample's main loss weighs the same (1, no offset).
    Under torch.distributed every process updates its state with the whole global batch
    (per-class accuracy summed, targets of every process's items gathered, maxima reduced),
    so the state stays identical on all processes. Batches must have one size on all of them.
    State (buffers, so it is in state_dict and moves with .to(device)):
        gate_targets (E, N) float, has_target (E, N) bool, max_weight (E,),
        class_correct / class_seen (E, K) float64 within the epoch, class_first_seen (K,)
        the epoch's sample position at which each class first appeared (inf: not yet), epoch.
    """

    def __init__(self, num_items: int, num_classes: int, num_exits: int = 4,
                 taus: Sequence[float] = DEFAULT_TAUS, supp_weight: float = 0.1,
                 gate_weight: float = 1.0, gamma0: float = 3.0, gamma: float = 1.0,
                 weight_offset: float = 0.1, balance_factor: float = 0.5, min_epochs: int = 1,
                 eps: float = 1e-5, method: Optional[Method] = None,
                 exit_weighting: bool = True):
        super().__init__()
        self.method = method if method is not None else Method(num_exits)
        if self.method.num_heads != num_exits:
            raise ValueError(f"the method has {self.method.num_heads} heads, the loss "
                             f"{num_exits} exits")
        self.exit_weighting = exit_weighting
        if len(taus) != num_exits:
            raise ValueError(f"need one tau per exit: {num_exits} exits, {len(taus)} taus")
        if num_items < 1 or num_classes < 1:
            raise ValueError("num_items and num_classes must be positive")
        self.num_items, self.num_classes, self.num_exits = num_items, num_classes, num_exits
        self.supp_weight, self.gate_weight = supp_weight, gate_weight
        self.gamma0, self.gamma, self.weight_offset = gamma0, gamma, weight_offset
        self.balance_factor, self.min_epochs, self.eps = balance_factor, min_epochs, eps
        self.register_buffer("taus", torch.tensor(list(taus), dtype=torch.float64))
        self.register_buffer("gate_targets", torch.zeros(num_exits, num_items))
        self.register_buffer("has_target", torch.zeros(num_exits, num_items, dtype=torch.bool))
        self.register_buffer("max_weight", torch.zeros(num_exits))
        self.register_buffer("class_correct", torch.zeros(num_exits, num_classes,
                                                          dtype=torch.float64))
        self.register_buffer("class_seen", torch.zeros(num_exits, num_classes,
                                                       dtype=torch.float64))
        self.register_buffer("class_first_seen", torch.full((num_classes,), float("inf"),
                                                            dtype=torch.float64))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))

    def on_epoch_start(self, epoch: int) -> None:
        """Start epoch `epoch` (0-based): reset the running maxima and the epoch's accuracy."""
        self.epoch.fill_(epoch)
        self.max_weight.zero_()
        self.class_correct.zero_()
        self.class_seen.zero_()
        self.class_first_seen.fill_(float("inf"))

    def _check(self, out: OccamOutput, labels: Tensor, items: Tensor) -> None:
        if len(out.exits) != self.num_exits:
            raise ValueError(f"the model has {len(out.exits)} exits, the loss {self.num_exits}")
        if any(e.supp is None for e in out.exits):
            raise ValueError("the model output has no suppression loss: call the model with labels")
        batch = labels.shape[0]
        if batch == 0:
            raise ValueError("OccamLoss got an empty batch")
        classes = out.exits[0].logits.shape[1]
        if classes != self.num_classes:
            raise ValueError(f"the model predicts {classes} classes, the loss "
                             f"expects {self.num_classes}")
        if items.shape != (batch,) or labels.shape != (batch,):
            raise ValueError(f"labels and item indices must both have shape ({batch},), got "
                             f"{tuple(labels.shape)} and {tuple(items.shape)}")
        # On the device, no host sync: a failure raises on CPU, device-asserts on CUDA.
        torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                            f"OccamLoss: labels must lie in [0, {self.num_classes})")
        torch._assert_async(((items >= 0) & (items < self.num_items)).all(),
                            f"OccamLoss: item indices must lie in [0, {self.num_items}), the "
                            f"dataset size given to OccamLoss")

    def _refresh(self, correct: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """(E,) bool: refresh each exit's gate targets from this batch?, and (E,) float64: the
        mean per-class accuracy it compared with tau. `correct` (E, B) is
        each exit right on each sample. Updates the epoch's per-class accuracy (this batch
        included) and compares its mean with tau, as the official does it: per-class
        accuracies summed in the order the classes first appeared in the epoch, float64."""
        batch = labels.shape[0]
        batch_correct = torch.zeros_like(self.class_correct).index_add_(1, labels, correct)
        batch_seen = torch.zeros_like(self.class_first_seen).index_add_(
            0, labels, torch.ones_like(correct[0]))
        # A class's first position: the samples before this batch in the epoch, then its
        # first index within the batch (the global batch under DDP, process by process).
        rank = dist.get_rank() if in_process_group() else 0
        position = (self.class_seen[0].sum() + rank * batch
                    + torch.arange(batch, device=labels.device, dtype=torch.float64))
        first = torch.full_like(self.class_first_seen, float("inf")).scatter_reduce_(
            0, labels, position, "amin")
        if in_process_group():
            counts = torch.cat([batch_correct, batch_seen[None]])
            dist.all_reduce(counts)
            batch_correct, batch_seen = counts[:-1], counts[-1]
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        self.class_correct += batch_correct
        self.class_seen += batch_seen
        torch.minimum(self.class_first_seen, first, out=self.class_first_seen)
        seen = self.class_seen
        per_class = self.class_correct / seen.clamp_min(1)  # 0 for a class not yet seen
        ordered = per_class[:, torch.argsort(self.class_first_seen, stable=True)]
        # Left to right, one class at a time: the official's rounding (a tree sum may differ
        # in the last bit, enough to flip a tie with tau). Unseen classes, last, add 0 exactly.
        total = torch.zeros_like(self.max_weight, dtype=torch.float64)
        for k in range(self.num_classes):
            total = total + ordered[:, k]
        mean_accuracy = total / (seen[0] > 0).sum().clamp_min(1)
        return (mean_accuracy <= self.taus) | (self.epoch < self.min_epochs), mean_accuracy

    def _gate_targets(self, correct: Tensor, labels: Tensor, items: Tensor
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(E, B) float gate targets: this batch's correctness where the exit refreshes (and
        for items never given one), else the stored ones; stored back per item (an item twice in
        the batch keeps its last copy's, as the official). With them
        _refresh's two (E,) results, for the logs, and the (2, E) exit and continue counts of
        the global batch (from the targets every process gathers under DDP: the balance of a
        process's own few samples would differ from one process holding them all)."""
        refresh, mean_accuracy = self._refresh(correct, labels)
        use_current = refresh[:, None] | ~self.has_target[:, items]
        targets = torch.where(use_current, correct.float(), self.gate_targets[:, items])
        all_items, all_targets = ((_all_gather(items), _all_gather(targets.t()).t())
                                  if in_process_group() else (items, targets))
        self.gate_targets[:, all_items] = all_targets[:, _last_copy(all_items, self.num_items)]
        self.has_target[:, all_items] = True
        counts = torch.stack([all_targets.sum(1), (1 - all_targets).sum(1)])
        return targets, refresh, mean_accuracy, counts

    def _gate_loss(self, gate_logit: Tensor, targets: Tensor, exit_count: Tensor,
                   continue_count: Tensor) -> Tensor:
        """Exit and continue samples balanced by their counts in the whole (global) batch."""
        largest = torch.maximum(exit_count, continue_count)
        exit_weight = (1.0 / (exit_count / largest + self.eps)) ** self.balance_factor
        continue_weight = (1.0 / (continue_count / largest + self.eps)) ** self.balance_factor
        weights = torch.where(targets > 0, exit_weight, continue_weight)
        # From the logit: a sigmoid rounded to 1.0 would leave a wrong gate no gradient.
        bce = F.binary_cross_entropy_with_logits(gate_logit.float(), targets, reduction="none")
        return (weights * bce).mean()

    def _main_loss(self, exit_index: int, logits: Tensor, previous_gate: Optional[Tensor],
                   labels: Tensor, groups: Optional[Tensor]) -> Tensor:
        sample_loss = self.method.sample_loss(logits, labels, groups)
        if not self.exit_weighting:
            return self.method.reduce(sample_loss, groups, exit_index)
        if exit_index == 0:
            p_true = torch.softmax(logits.detach(), dim=1).gather(1, labels[:, None])[:, 0]
            weight = p_true ** self.gamma0
        else:
            weight = (1 - previous_gate.detach().float()) ** self.gamma
        batch_max = weight.max()
        if in_process_group():
            dist.all_reduce(batch_max, op=dist.ReduceOp.MAX)
        self.max_weight[exit_index] = torch.maximum(self.max_weight[exit_index], batch_max)
        weight = weight / (self.max_weight[exit_index] + self.eps)
        return self.method.reduce((weight + self.weight_offset) * sample_loss, groups,
                                  exit_index)

    def forward(self, out: OccamOutput, labels: Tensor, items: Tensor,
                groups: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(total loss, {"supp/E0": ..., "gate/E0": ..., "main/E0": ..., ...} and the gate's
        state per exit, GATE_STATE_PARTS) for one batch.

        `out` is an OccamNet output computed with labels; `items` are dataset item indices;
        `groups` their bias groups (for a method that uses them). Updates the state (call in
        training only).
        """
        self._check(out, labels, items)
        if self.method.uses_groups and (groups is None or groups.shape != labels.shape):
            raise ValueError(f"method {self.method.name} needs each sample's bias group: pass "
                             f"groups of shape {tuple(labels.shape)}")
        total = torch.zeros((), device=labels.device)
        parts: Dict[str, Tensor] = {}
        with torch.no_grad():
            correct = torch.stack([e.logits.argmax(dim=1) == labels for e in out.exits]).double()
            targets, refresh, mean_accuracy, counts = self._gate_targets(correct, labels,
                                                                         items)
        for t, exit_out in enumerate(out.exits):
            logits = exit_out.logits.float()
            supp = self.supp_weight * exit_out.supp.float().mean()
            gate = self.gate_weight * self._gate_loss(exit_out.gate_logit, targets[t],
                                                      counts[0, t], counts[1, t])
            main = self._main_loss(t, logits, out.exits[t - 1].gate if t else None, labels,
                                   groups)
            total = total + supp + gate + main
            parts[f"supp/E{t}"], parts[f"gate/E{t}"], parts[f"main/E{t}"] = (
                supp.detach(), gate.detach(), main.detach())
        with torch.no_grad():  # all exits at once: 4 small kernels a step, no host read
            # 0.5 is exact in every float dtype: comparing in the gate's own dtype decides as
            # inference's float64 comparison does. `refresh` stays bool: a log step converts
            # every part to float when it reads them, the other steps need no conversion.
            state = {"train_acc": mean_accuracy, "exit_targets": counts[0] / counts.sum(0),
                     "refreshing": refresh,
                     "gate_open": (torch.stack(out.gates) >= 0.5).mean(1, dtype=torch.float64)}
        for name in GATE_STATE_PARTS:
            parts.update((f"{name}/E{t}", value) for t, value in enumerate(state[name]))
        return total, parts
