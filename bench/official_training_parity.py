"""Our training against the official code's, step by step, from the same weights and batches.

    python bench/official_training_parity.py --official PATH/TO/occam-nets-v1

bench/official_parity.py checks one forward pass, tests/test_loss_parity.py the loss against a
restatement of the official semantics. This runs the official code itself for a few epochs:
its occam_resnet18_img64 trained by its OccamTrainer's training_step (every exit's CAM
suppression, gate and gate-weighted CE losses, the per-item gate targets kept across epochs,
the forced first epoch; Lightning's loop left out, bench/official_code.py), and ours, loaded
with the official's initial weights (occamnets.models.official) and trained with the objective
and optimiser `occamnets train` builds from the repro preset's config (make_objective,
make_optimizer). Both see the same batches, in the same order, with the same item indices, in
fp32 with TF32 off.

In lockstep: after each step ours takes the official's new weights and BatchNorm statistics, so
every step compares one step of each from the same point. Everything else is each side's own
over all epochs: the optimiser's moments, and each exit gate's state (the per-item targets, the
epoch's per-class accuracy, the running maxima). Run free (--free-running, a picture and not a
check), the two drift apart as the official code drifts from a copy of itself with every weight
one float32 rounding away, which the table shows beside them.

Printed per epoch, the largest differences: of every loss part (supp, gate, main per exit, and
the total; relative), of each parameter's gradient and of the BatchNorm statistics after the
forward pass (norm-relative, per tensor); how many steps refreshed each exit's gate targets;
and whether the stored targets are the same items with the same values. The biases that a
BatchNorm follows are apart: their gradient is zero but for rounding, so the table shows its
size against the largest gradient's. The data are synthetic (a class colour pattern under
noise), so the exits' training accuracy climbs past their taus and both target paths run.

Exit status 1 when the repro preset's loss settings are not the official trainer's, a loss part
differs by more than --tolerance, a gradient or a statistic by more than --gradient-tolerance,
or the stored gate targets differ. `--set NAME=VALUE` changes our config only (to see the
check fail).
"""
import argparse
import copy
import dataclasses
import os
import sys
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from occamnets.config import RunConfig  # noqa: E402
from occamnets.data.loaders import LabelledItems  # noqa: E402
from occamnets.losses import LOSS_PARTS  # noqa: E402
from occamnets.models import occam_resnet18  # noqa: E402
from occamnets.models.official import (from_official_state_dict,  # noqa: E402
                                       load_official_state_dict)
from occamnets.train import make_objective, make_optimizer  # noqa: E402

from gpu_check import relative_error  # noqa: E402
from official_code import OCCAM_TRAINER_SETTINGS, import_official, official_training_step  # noqa: E402,E501


def settings_mismatches(config: RunConfig) -> List[str]:
    """Where our config's loss settings differ from the official trainer's (empty: none)."""
    supp, gating = OCCAM_TRAINER_SETTINGS.cam_suppression, OCCAM_TRAINER_SETTINGS.exit_gating
    pairs = {"supp_weight": supp.loss_wt, "gate_weight": gating.loss_wt,
             "gamma0": gating.gamma0, "gamma": gating.gamma,
             "taus": tuple(gating.train_acc_thresholds), "min_epochs": gating.min_epochs,
             "weight_offset": gating.weight_offset, "balance_factor": gating.balance_factor,
             "effective_supp_weight": supp.loss_wt}
    return [f"{name}: ours {getattr(config, name)}, official {value}"
            for name, value in pairs.items() if getattr(config, name) != value]


def parsed_like(current, text: str):
    """`text` as a value of `current`'s type (a tuple from comma-separated numbers)."""
    if isinstance(current, tuple):
        return tuple(float(part) for part in text.split(","))
    return type(current)(text)


def synthetic_data(items: int, classes: int, size: int, seed: int):
    """Images (items, 3, size, size) in [0, 1]: a fixed smooth pattern per class, half
    strength, under uniform noise, and labels cycling through the classes."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 3, 4, 4, generator=generator)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                               align_corners=False)
    labels = torch.arange(items) % classes
    noise = torch.rand(items, 3, size, size, generator=generator)
    return (0.5 * patterns[labels] + 0.5 * noise), labels


def biases_before_batchnorm(model: torch.nn.Module) -> List[str]:
    """Biases of a conv or linear layer that a BatchNorm follows: in training mode the norm
    subtracts them again, so their gradient is zero but for rounding (the official exits and
    gates have such biases), and comparing it would compare rounding noise."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            for index, (layer, following) in enumerate(zip(module, list(module)[1:])):
                if (isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))
                        and layer.bias is not None
                        and isinstance(following, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))):
                    names.append(f"{prefix}.{index}.bias")
    return names


def norm_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: elements that are rounding noise weigh as little as they are."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gradient_differences(ours, theirs, apart: List[str]) -> Tuple[float, float]:
    """(the largest norm-relative gradient difference over our parameters but `apart`; the
    largest gradient norm among `apart`, either side's, over the largest of the others')."""
    their_grads = from_official_state_dict({name: p.grad for name, p in theirs.named_parameters()})
    difference, largest, largest_apart = 0.0, 0.0, 0.0
    for name, parameter in ours.named_parameters():
        norms = max(parameter.grad.norm().item(), their_grads[name].norm().item())
        if name in apart:
            largest_apart = max(largest_apart, norms)
        else:
            largest = max(largest, norms)
            difference = max(difference, norm_relative(parameter.grad, their_grads[name]))
    return difference, largest_apart / largest


def statistics_difference(ours, theirs) -> float:
    """Largest norm-relative difference of the BatchNorm running statistics."""
    their_buffers = from_official_state_dict(dict(theirs.named_buffers()))
    return max(norm_relative(value, their_buffers[name])
               for name, value in ours.named_buffers() if value.is_floating_point())


class OfficialSide:
    """An official model trained by the official OccamTrainer's training_step and Adam (as
    ours: make_optimizer), with the loss parts its step logs ("supp E=0", ..., and "total")."""

    def __init__(self, checkout: str, model: torch.nn.Module, config: RunConfig):
        self.driver = official_training_step(checkout, model)
        self.parts: Dict[str, torch.Tensor] = {}
        self.driver.log = lambda name, value, **kwargs: self.parts.__setitem__(
            name, value.detach())
        self.optimizer = make_optimizer(config, model.parameters())

    def loss(self, x, y, rows, epoch: int, step: int) -> torch.Tensor:
        self.parts.clear()
        self.driver.current_epoch = epoch
        loss = self.driver.training_step({"x": x, "y": y, "item_ix": rows}, step)
        self.parts["total"] = loss.detach()
        return loss

    def targets(self, exit_index: int) -> Dict[int, float]:
        """The stored gate targets of exit `exit_index`: item -> 0.0 or 1.0."""
        return dict(getattr(self.driver, f"ExitGateLoss_{exit_index}").item_to_correctness)


def nudged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `model` with every parameter element one float rounding up or down."""
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for parameter in copy_.parameters():
            up = torch.rand(parameter.shape, generator=generator) < 0.5
            towards = torch.where(up, float("inf"), float("-inf")).to(parameter)
            parameter.copy_(torch.nextafter(parameter, towards))
    return copy_


def largest_difference(parts: Dict[str, torch.Tensor],
                       official: Dict[str, torch.Tensor]) -> float:
    """Largest relative difference over the official's loss parts."""
    return max(relative_error(parts[name], value) for name, value in official.items())


def our_targets(loss, exit_index: int) -> Dict[int, float]:
    """OccamLoss's stored gate targets of exit `exit_index`: item -> 0.0 or 1.0 (one copy to
    the host, not one per item)."""
    held = loss.has_target[exit_index].nonzero().flatten()
    return dict(zip(held.tolist(), loss.gate_targets[exit_index, held].tolist()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of erobic/occam-nets-v1")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=24, help="image side, pixels")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="reference",
                        help="our exit heads' backend: reference, triton or auto")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest relative difference of a loss part")
    parser.add_argument("--gradient-tolerance", type=float, default=1e-3,
                        help="largest norm-relative difference of a gradient or a BatchNorm "
                             "statistic")
    parser.add_argument("--free-running", action="store_true",
                        help="no lockstep, and not a check: each side keeps its own weights, "
                             "beside the official code's drift from itself nudged by one "
                             "rounding")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one setting of our config, not the official's (a tuple "
                             "as comma-separated numbers): to see the check fail")
    args = parser.parse_args()
    device = torch.device(args.device)
    # The comparison is of arithmetic, not speed: TF32 would round both sides' convs and
    # matmuls to 10-bit mantissas, differently in our exit heads than in the official ones.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    config = RunConfig.from_preset("repro")
    for assignment in args.set:
        name, value = assignment.split("=", 1)
        config = dataclasses.replace(config, **{name: parsed_like(getattr(config, name), value)})
    mismatches = settings_mismatches(config)
    for line in mismatches:
        print(f"setting differs: {line}")

    official = import_official(args.official, "models.occam_resnet")
    torch.manual_seed(args.seed)
    theirs = official.occam_resnet18_img64(args.classes, width=args.width,
                                           exits_kwargs={}).to(device).train()
    ours = load_official_state_dict(
        occam_resnet18(args.classes, width=args.width, stem="3x3", backend=args.backend),
        theirs.state_dict()).to(device).train()
    # Free-running, the official code beside itself with every weight one rounding away: how
    # far float rounding alone carries a run from the official one.
    sides = [OfficialSide(args.official, model, config) for model in
             ([theirs, nudged(theirs, args.seed)] if args.free_running else [theirs])]
    official_side = sides[0]

    num_items = args.batches * args.batch_size
    images, labels = synthetic_data(num_items, args.classes, args.size, args.seed)
    images, labels = images.to(device), labels.to(device)
    train = LabelledItems(labels, torch.zeros(num_items, 1), ["none"], device=device)
    objective = make_objective(config, ours, train, args.classes, device)
    our_optimizer = make_optimizer(config, ours.parameters())
    optimizers = [side.optimizer for side in sides] + [our_optimizer]
    order_generator = torch.Generator().manual_seed(args.seed + 1)

    worst_part, worst_gradient, worst_apart, same_targets = 0.0, 0.0, 0.0, True
    worst_control = 0.0
    apart = biases_before_batchnorm(ours)
    print(f"{args.epochs} epochs x {args.batches} steps of {args.batch_size} images, "
          f"{args.size} px, width {args.width}, {args.classes} classes, {config.optimizer} "
          f"lr {config.lr:g}, on {device}, our exit heads' backend {args.backend}, "
          f"{'free-running' if args.free_running else 'in lockstep'}")
    print(f"largest differences per epoch: loss parts (relative), gradients and BatchNorm "
          f"statistics (norm-relative); apart: the {len(apart)} biases a BatchNorm follows, "
          f"their largest gradient norm over the others'")
    print("epoch | loss parts | gradients | BN statistics | apart | steps refreshed E0..E3 | "
          "stored targets same | items stored E0..E3"
          + (" | official nudged: loss parts" if args.free_running else ""))
    for epoch in range(args.epochs):
        objective.on_epoch_start(epoch)
        order = torch.randperm(num_items, generator=order_generator).to(device)
        epoch_parts, epoch_gradients, epoch_statistics, epoch_apart = 0.0, 0.0, 0.0, 0.0
        epoch_control, refreshed = 0.0, [0] * ours.num_exits
        for step in range(args.batches):
            rows = order[step * args.batch_size:(step + 1) * args.batch_size]
            x, y = images[rows], labels[rows]
            losses = [side.loss(x, y, rows, epoch, step) for side in sides]
            out = objective(ours, x, y, rows, progress=0.0)
            for optimizer, loss in zip(optimizers, losses + [out.loss]):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            gradients, gradients_apart = gradient_differences(ours, theirs, apart)
            for optimizer in optimizers:
                optimizer.step()
            ours_parts = {"total": out.loss.detach()}
            for t in range(ours.num_exits):
                ours_parts.update((f"{kind} E={t}", out.parts[f"{kind}/E{t}"])
                                  for kind in LOSS_PARTS)
                refreshed[t] += int(out.parts[f"refreshing/E{t}"])
            epoch_parts = max(epoch_parts, largest_difference(ours_parts, official_side.parts))
            if args.free_running:
                epoch_control = max(epoch_control,
                                    largest_difference(sides[1].parts, official_side.parts))
            epoch_gradients = max(epoch_gradients, gradients)
            epoch_apart = max(epoch_apart, gradients_apart)
            epoch_statistics = max(epoch_statistics, statistics_difference(ours, theirs))
            if not args.free_running:
                # Lockstep: ours continues from the official's weights, so the next step
                # compares one step of each from the same point.
                load_official_state_dict(ours, theirs.state_dict())
        held = [our_targets(objective.loss, t) for t in range(ours.num_exits)]
        same = [targets == official_side.targets(t) for t, targets in enumerate(held)]
        stored = [len(targets) for targets in held]
        print(f"{epoch:5d} | {epoch_parts:.2e} | {epoch_gradients:.2e} | "
              f"{epoch_statistics:.2e} | {epoch_apart:.2e} | {refreshed} | {all(same)} | "
              f"{stored}" + (f" | {epoch_control:.2e}" if args.free_running else ""))
        worst_part = max(worst_part, epoch_parts)
        worst_gradient = max(worst_gradient, epoch_gradients, epoch_statistics)
        worst_apart = max(worst_apart, epoch_apart)
        same_targets = same_targets and all(same)
        worst_control = max(worst_control, epoch_control)

    settings = "differ" if mismatches else "are the official trainer's"
    if args.free_running:  # a picture of drift, not a check: the status says the settings
        print(f"free-running (not a check): ours against the official, loss parts within "
              f"{worst_part:.2e}; the official against itself nudged by one rounding, "
              f"{worst_control:.2e}; settings {settings}")
        return 1 if mismatches else 0
    ok = (not mismatches and worst_part <= args.tolerance and same_targets
          and worst_gradient <= args.gradient_tolerance)
    print(f"{'PASS' if ok else 'FAIL'}: loss parts within {worst_part:.2e} (tolerance "
          f"{args.tolerance:.0e}), gradients and BN statistics within {worst_gradient:.2e} "
          f"(tolerance {args.gradient_tolerance:.0e}; the biases a BatchNorm follows: "
          f"{worst_apart:.2e}), stored gate targets the same: {same_targets}, settings "
          f"{settings}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
