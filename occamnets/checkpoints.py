"""The checkpoint file: written atomically, read without running code.

A checkpoint is a dict of tensors and plain data (numbers, strings, lists, dicts): the run's
config as `RunConfig.to_dict()`, the weights, and for training the optimiser, scheduler,
objective and RNG states. It is read with `torch.load(weights_only=True)`, which builds only
those types, so a crafted file cannot run code (users share checkpoints). Format 2 (from
2026-11-27) is the first such format; older files held numpy objects and are refused.
"""
import os
import pickle
import shlex
import zipfile
from typing import Dict, Optional

import torch

from .config import RunConfig, UnknownSettings
from .files import atomic_path, remove_stale_temporaries

CHECKPOINT_FORMAT = 2
# What every occamnets checkpoint holds; a training checkpoint holds more (train.py).
REQUIRED_KEYS = ("format", "config", "model", "num_classes")


class NewerCheckpoint(ValueError):
    """A whole checkpoint this version cannot read (a newer format or settings): not damaged,
    so not to be deleted."""


def write_checkpoint(state: Dict, path: str) -> None:
    """`state` (plain data and tensors) to `path` atomically, tagged with the format."""
    directory = os.path.dirname(path) or "."
    remove_stale_temporaries(directory)
    with atomic_path(path) as tmp:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), tmp)


def start_over_hint(path: str) -> str:
    return (f"to start over, remove it (rm {shlex.quote(path)}) or train into another --out")


def resume_command(run_dir: str, processes: int = 1, per_node: Optional[int] = None) -> str:
    """The command that continues the run in `run_dir`, quoted for the shell (a path with
    spaces pasted back unquoted would name another directory); a run of several processes
    (`per_node` on each node, all on one by default) continues under torchrun with as many
    (another number is refused)."""
    if processes == 1:
        return f"`occamnets train --out {shlex.quote(run_dir)} --resume`"
    per_node = per_node or processes
    nodes = f"--nnodes={processes // per_node} " if per_node < processes else ""
    return (f"`torchrun {nodes}--nproc_per_node={per_node} -m occamnets.cli train --out "
            f"{shlex.quote(run_dir)} --resume` ({processes} processes in all, as before"
            + (", with the same rendezvous options" if nodes else "") + ")")


def read_checkpoint(path: str, map_location="cpu", mmap: bool = True) -> Dict:
    """The checkpoint at `path`; a ValueError saying what is wrong with the file otherwise
    (FileNotFoundError when there is none). mmap: only the parts used are read from disk
    (for a model; training state that is updated in place is read whole)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (a write that was cut off?)")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise ValueError(f"{path} is not a checkpoint torch can read (not a torch.save zip "
                         f"archive: truncated, or another kind of file)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"{path} is not a checkpoint torch can read (truncated or "
                             f"corrupt?): {_first_line(error)}") from error
        raise ValueError(f"{path} holds objects other than tensors and plain data, so it is "
                         f"not loaded (loading it could run code): it was written by "
                         f"occamnets before checkpoint format {CHECKPOINT_FORMAT} "
                         f"(2026-11-27), or by another program") from error
    except Exception as error:  # torch raises RuntimeError, EOFError, zip errors, ...
        raise ValueError(f"{path} is not a checkpoint torch can read (truncated or "
                         f"corrupt?): {_first_line(error)}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not an occamnets checkpoint (it holds a "
                         f"{type(checkpoint).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing == ["format"]:
        raise ValueError(f"{path} was written by occamnets before checkpoint format "
                         f"{CHECKPOINT_FORMAT} (2026-11-27); this version does not read it")
    if missing:
        raise ValueError(f"{path} is not an occamnets checkpoint (it has no "
                         f"{', '.join(missing)})")
    written = checkpoint["format"]
    if written != CHECKPOINT_FORMAT:
        newer = isinstance(written, int) and written > CHECKPOINT_FORMAT
        raise (NewerCheckpoint if newer else ValueError)(
            f"{path} has checkpoint format {written!r}; this version of occamnets reads "
            f"format {CHECKPOINT_FORMAT}")
    problem = _structure_problem(checkpoint)
    if problem is not None:
        raise ValueError(f"{path} is not an occamnets checkpoint ({problem})")
    try:
        RunConfig.from_dict(checkpoint["config"])
    except UnknownSettings as error:
        raise NewerCheckpoint(f"{path}: {error} (written by a newer occamnets?)") from error
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return checkpoint


def _structure_problem(checkpoint: Dict) -> Optional[str]:
    """What makes a checkpoint's parts the wrong kind (an edited or foreign file), else None:
    found here, not as a TypeError deep in the model's construction."""
    classes = checkpoint["num_classes"]
    names = checkpoint.get("class_names")
    if not isinstance(checkpoint["model"], dict) or not all(
            isinstance(t, torch.Tensor) for t in checkpoint["model"].values()):
        return "its model is not a table of tensors"
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        return f"num_classes is {classes!r}"
    if names is not None and (not isinstance(names, list) or len(names) != classes
                              or not all(isinstance(n, str) for n in names)):
        return f"class_names is not a list of {classes} names"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
