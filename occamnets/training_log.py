"""An OccamNet run's exit gates over training, read back from its metrics.jsonl: the gate's
state that OccamLoss logs beside the loss parts (occamnets/losses.py, GATE_STATE_PARTS) in the
step records, and the exits taken on the validation splits in the epoch records
(train.exit_record). The results page tabulates it and viz.save_gate_history draws it: when
OccamResNet loses to ResNet, this says whether its gates sent images to exits that only
learned the shortcuts (issue 17, item 4)."""
import dataclasses
from typing import Dict, List, Optional, Sequence

from .data.biased_mnist import VAL_MIXED


@dataclasses.dataclass
class ExitHistory:
    """One exit over one run. Step series are per logged step (every log_every steps), epoch
    series per epoch; None where an epoch record has no value (no image left there)."""
    exit_index: int
    tau: float                        # the refresh rule's accuracy threshold for this exit
    steps: List[int]                  # global step of each step record
    step_epochs: List[int]            # the epoch (1-based) each step record belongs to
    train_accuracy: List[float]       # the epoch's running mean per-class training accuracy
    exit_targets: List[float]         # share of the batch whose gate target says "exit"
    refreshing: List[float]           # 1: targets from this batch's predictions, 0: stored
    gate_open: List[float]            # share of the batch whose gate is >= 0.5
    main_loss: List[float]
    gate_loss: List[float]
    epochs: List[int]
    val_share: List[Optional[float]]          # share of the validation split leaving here
    mixed_share: List[Optional[float]]        # the same on the p_bias 0.5 validation split
    mixed_accuracy: List[Optional[float]]     # accuracy of the images that left here there

    def in_epoch(self, epoch: int, series: List[float]) -> List[float]:
        """The values of step `series` logged within `epoch` (1-based)."""
        return [v for e, v in zip(self.step_epochs, series) if e == epoch]


def read_gate_history(step_records: Sequence[Dict], epoch_records: Sequence[Dict],
                      taus: Sequence[float]) -> List[ExitHistory]:
    """Each exit's history, from the records of one run's metrics.jsonl (read_metrics);
    an empty list when the steps logged no gate state (a ResNet run, or a log written before
    the gate state was logged)."""
    logged = [r for r in step_records if "exit_targets/E0" in r]
    if not logged:
        return []
    histories = []
    for t, tau in enumerate(taus):
        def steps(name: str) -> List[float]:
            return [r[f"{name}/E{t}"] for r in logged]

        def epochs(name: str) -> List[Optional[float]]:
            return [r.get(f"{name}/E{t}") for r in epoch_records]

        histories.append(ExitHistory(
            exit_index=t, tau=tau, steps=[r["global_step"] for r in logged],
            step_epochs=[r["epoch"] for r in logged],
            train_accuracy=steps("train_acc"), exit_targets=steps("exit_targets"),
            refreshing=steps("refreshing"), gate_open=steps("gate_open"),
            main_loss=steps("main"), gate_loss=steps("gate"),
            epochs=[r["epoch"] for r in epoch_records], val_share=epochs("val_exit_share"),
            mixed_share=epochs(f"{VAL_MIXED}_exit_share"),
            mixed_accuracy=epochs(f"{VAL_MIXED}_exit_accuracy")))
    return histories


def epoch_ends(epoch_records: Sequence[Dict]) -> List[int]:
    """The global step at each epoch's end, in order."""
    return sorted(r["global_step"] for r in epoch_records)
