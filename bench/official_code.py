"""The official OccamNets code (github.com/erobic/occam-nets-v1), imported from a checkout.

Not a dependency: bench/official_parity.py and bench/bench_official.py use it when given a
checkout (a GPU window carries one in an ignored folder, see bench/NOTES.md). Its files import
packages that its model and its training losses never use (cv2, pytorch_grad_cam, netcal,
sklearn, PyTorch Lightning); where one is missing it is replaced by a stand-in module. Nothing
of the official code is copied here.
"""
import importlib
import os
import sys
import types
from types import SimpleNamespace

import torch

# Imported by the official model's and trainer's files, used only by their tools.
OPTIONAL_IMPORTS = ["cv2", "pytorch_grad_cam", "pytorch_grad_cam.utils.model_targets",
                    "netcal", "netcal.presentation", "netcal.metrics", "sklearn",
                    "sklearn.metrics"]


def _any_name(attribute):
    if attribute.startswith("__"):  # module machinery (__path__, __spec__, ...) stays absent
        raise AttributeError(attribute)
    return None


def _stub_missing(names):
    """Stand-ins for modules the official files import but the model and losses never use."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            for part in range(1, name.count(".") + 2):
                module_name = ".".join(name.split(".")[:part])
                module = sys.modules.setdefault(module_name, types.ModuleType(module_name))
                module.__getattr__ = _any_name  # any name it imports exists


def _stub_lightning():
    """The official trainers subclass pl.LightningModule; without Lightning, nn.Module stands
    in for it (the training step uses self.model, self.log and self.current_epoch only)."""
    try:
        importlib.import_module("pytorch_lightning")
    except ImportError:
        module = types.ModuleType("pytorch_lightning")
        module.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = module


def import_official(checkout: str, module: str):
    """`module` (e.g. "models.occam_resnet") from the official checkout at `checkout`."""
    root = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(root, "models", "occam_resnet.py")):
        raise FileNotFoundError(f"{checkout} is not a checkout of erobic/occam-nets-v1 (no "
                                f"models/occam_resnet.py in it)")
    if root not in sys.path:
        sys.path.insert(0, root)
    _stub_missing(OPTIONAL_IMPORTS)
    _stub_lightning()
    return importlib.import_module(module)


# conf/trainer/occam_trainer.yaml of the official repository: the OccamTrainer's loss settings.
OCCAM_TRAINER_SETTINGS = SimpleNamespace(
    cam_suppression=SimpleNamespace(loss_wt=0.1),
    exit_gating=SimpleNamespace(loss_wt=1, gamma0=3, gamma=1,
                                train_acc_thresholds=[0.5, 0.6, 0.7, 0.8], min_epochs=1,
                                weight_offset=0.1, balance_factor=0.5))


def official_training_step(checkout: str, model: torch.nn.Module):
    """The official OccamTrainer's training_step (every exit's CAM suppression, gate and
    gate-weighted CE losses, with its per-item bookkeeping) around `model`, an official
    OccamResNet, without Lightning's loop: call it with (batch, batch_idx), where batch holds
    "x", "y" and "item_ix"; it returns the loss. `.current_epoch` may be set."""
    trainers = import_official(checkout, "trainers.occam_trainer")

    class OfficialStep(trainers.OccamTrainer):
        def __init__(self):
            # Not BaseTrainer.__init__: it builds the model from a Hydra config.
            torch.nn.Module.__init__(self)
            self.model = model
            self.trainer_cfg = OCCAM_TRAINER_SETTINGS
            self.num_exits = len(model.multi_exit.exit_block_nums)
            self.current_epoch = 0

        def log(self, *args, **kwargs):  # Lightning's logger: nothing to log to here
            pass

    return OfficialStep()
