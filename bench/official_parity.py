"""Our OccamResNet-18 against the official code's, on the same weights and inputs.

    python bench/official_parity.py --official PATH/TO/occam-nets-v1

PATH is a checkout of github.com/erobic/occam-nets-v1 (not a dependency: this script is for
checking parity by hand or in a GPU window, where the official code is carried along). The
official model's imports that only its CAM tools need (cv2, pytorch_grad_cam) are stubbed when
missing (bench/official_code.py). For both stems, the official model is built with random BN
statistics and biases, its state_dict is loaded into ours through occamnets.models.official,
and per exit the largest difference of logits and gates is printed, in eval and train mode,
with the early-exit choice.
Exit status 1 when a difference exceeds --tolerance or the exits chosen differ.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from occamnets.models import occam_resnet18  # noqa: E402
from occamnets.models.official import load_official_state_dict  # noqa: E402

from official_code import import_official  # noqa: E402


def _randomise(model):
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("running_mean") or name.endswith("bias"):
                tensor.normal_(0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
        for exit_module in model.multi_exit.exits:  # gates well inside (0, 1), not saturated
            exit_module.gate.net[3].weight.mul_(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of erobic/occam-nets-v1")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    official = import_official(args.official, "models.occam_resnet")
    torch.manual_seed(0)
    worst, same_exits = 0.0, True
    for builder, stem, size in ((official.occam_resnet18, "7x7", 160),
                                (official.occam_resnet18_img64, "3x3", 64)):
        theirs = builder(10, exits_kwargs={})
        _randomise(theirs)
        ours = load_official_state_dict(occam_resnet18(10, stem=stem, backend="reference"),
                                        theirs.state_dict())
        x = torch.rand(8, 3, size, size)
        for training in (False, True):
            theirs.train(training), ours.train(training)
            with torch.no_grad():
                expected, got = theirs(x), ours(x)
            for t, exit_out in enumerate(got.exits):
                logits = (expected[f"E={t}, logits"] - exit_out.logits).abs().max().item()
                gates = (expected[f"E={t}, gates"] - exit_out.gate).abs().max().item()
                worst = max(worst, logits, gates)
                low, high = exit_out.gate.min().item(), exit_out.gate.max().item()
                print(f"{stem} {'train' if training else 'eval '} E{t}: max |logits diff| "
                      f"{logits:.2e}, max |gate diff| {gates:.2e} (gates {low:.3f}..{high:.3f})")
        theirs.eval(), ours.eval()
        with torch.no_grad():
            chosen = [int(n.split("=")[1]) for n in theirs(x)["early_exit_names"]]
            ours_chosen = ours.early_exit(x).exit_index.tolist()
        same_exits &= chosen == ours_chosen
        print(f"{stem} early exit: official {chosen}, ours {ours_chosen}")
    print(f"parameters: ours {sum(p.numel() for p in occam_resnet18(10).parameters()):,}, "
          f"official {sum(p.numel() for p in official.occam_resnet18(10, exits_kwargs={}).parameters()):,}")
    ok = worst <= args.tolerance and same_exits
    print(f"{'PASS' if ok else 'FAIL'}: largest difference {worst:.2e} (tolerance "
          f"{args.tolerance:.0e}), same exits chosen: {same_exits}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
