"""Pictures: CAM heatmaps of every exit, the exit distribution of early-exit inference,
reliability diagrams (calibration) per exit, the accuracy chart of a comparison grid, and an
OccamNet's exit gates over training."""
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .evaluate import CamPictureData, ExitDiagnostics
from .files import atomic_path
from .metrics import Reliability
from .training_log import ExitHistory


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _to_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 or float -> (H, W, 3) float in [0, 1] for imshow."""
    array = image.detach().float().cpu()
    if image.dtype == torch.uint8:
        array = array / 255.0
    else:
        array = (array - array.min()) / (array.max() - array.min() + 1e-8)
    return array.permute(1, 2, 0).numpy()


def save_cam_grid(path: str, data: CamPictureData,
                  class_names: Optional[Sequence[str]] = None) -> str:
    """One row per image: the image, then the CAM of each exit used at inference for its
    predicted class (a ResNet: of its last stage), upsampled onto the image; the exit the
    sample took is framed in red. `data` comes from occamnets.evaluate.cam_picture_data."""
    title = ("Class activation maps of the last stage for the predicted class"
             if data.exit_taken is None else
             "Class activation maps of each exit for its predicted class")
    return save_cam_comparison(path, [("", data)], class_names, title)


def save_cam_comparison(path: str, models: Sequence[Tuple[str, CamPictureData]],
                        class_names: Optional[Sequence[str]] = None,
                        title: str = "Class activation maps for the predicted class") -> str:
    """One row per image, the image first, then each model's CAM columns (an OccamNet's exits,
    the exit taken framed in red; a ResNet's output), each column titled with the model's
    short name (may be empty; a second line may name its run), the column and the class it
    predicted; the image is titled with its label, or its caption (an image file's name).
    Every model's data must hold the
    same images (cam_picture_data of the same split, or cams_of_images of the same files)."""
    if not models:
        raise ValueError("no model to draw")
    first = models[0][1]
    for name, data in models[1:]:
        same_labels = (data.labels is None) == (first.labels is None) and (
            data.labels is None or torch.equal(data.labels.cpu(), first.labels.cpu()))
        if not (torch.equal(data.images.cpu(), first.images.cpu()) and same_labels
                and data.captions == first.captions):
            raise ValueError(f"the CAMs of {name or 'a model'} are of other images than the "
                             f"first model's: draw both from the same split and count")
    plt = _pyplot()
    count = first.images.shape[0]
    columns = 1 + sum(len(data.cams) for _, data in models)
    fig, axes = plt.subplots(count, columns, figsize=(1.9 * columns, 1.9 * count),
                             squeeze=False)
    name = (lambda k: class_names[k]) if class_names else str
    for row in range(count):
        picture = _to_image(first.images[row])
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(first.captions[row] if first.captions is not None
                               else f"label {name(int(first.labels[row]))}", fontsize=8)
        column = 1
        for model_name, data in models:
            for index, cam in enumerate(data.cams):
                predicted = int(data.predictions[index][row])
                taken = data.exit_taken is not None and data.exit_taken[row] == index
                # A name of several lines (the model and its run) keeps the column apart.
                joint = "\n" if "\n" in model_name else " "
                label = joint.join(filter(None, [model_name, data.column_names[index]]))
                _draw_cam(axes[row, column], picture, cam[row, predicted],
                          f"{label}: {name(predicted)}" + (" (exit)" if taken else ""), taken)
                column += 1
        for axis in axes[row]:
            axis.set_xticks([]), axis.set_yticks([])
    # Each CAM is scaled to its own range: side by side they compare where, not how strongly.
    fig.suptitle(f"{title}\n(each CAM min-max scaled on its own)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def _draw_cam(axis, picture: np.ndarray, cam: torch.Tensor, title: str, framed: bool) -> None:
    """One CAM (h, w), min-max scaled, then upsampled over its image; framed in red if asked.
    A constant CAM (a 1x1 last stage on small images) is drawn flat: scaling its rounding
    differences after upsampling would paint noise."""
    cam = cam.detach().float()
    finite = bool(torch.isfinite(cam).all())
    spread = cam.max() - cam.min()
    flat = spread <= 1e-6 * cam.abs().max().clamp_min(1.0)
    scaled = torch.zeros_like(cam) if flat else (cam - cam.min()) / spread
    heat = torch.nn.functional.interpolate(scaled[None, None], size=picture.shape[:2],
                                           mode="bilinear", align_corners=False)[0, 0]
    axis.imshow(picture)
    # 0..1 fixed: the min-max scaling above is the only one (imshow would stretch again).
    axis.imshow(heat.cpu().numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    axis.set_title(title + ("" if finite else "\n(non-finite CAM: not drawn)"), fontsize=8,
                   color="red" if framed else "black")
    if framed:
        for spine in axis.spines.values():
            spine.set_edgecolor("red"), spine.set_linewidth(3)


def save_exit_distribution(path: str, exit_counts: Sequence[int],
                           exit_accuracy: Optional[Sequence[float]] = None,
                           title: str = "Where samples exit",
                           first_inference_exit: int = 0) -> str:
    """Bar chart of the share of samples per exit, with each exit's accuracy on its samples;
    exits before `first_inference_exit` (E0 of an OccamNet) are marked unused, not 0%."""
    plt = _pyplot()
    counts = np.asarray(exit_counts, dtype=float)
    shares = counts / max(counts.sum(), 1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = [f"E{t}" + ("\n(not used at\ninference)" if t < first_inference_exit else "")
             for t in range(len(counts))]
    bars = ax.bar(names, 100 * shares, color="tab:blue")
    for t, bar in enumerate(bars):
        if t < first_inference_exit:
            continue
        text = f"{100 * shares[t]:.0f}%"
        if exit_accuracy is not None and counts[t] > 0:
            text += f"\nacc {100 * exit_accuracy[t]:.0f}%"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("% of samples")
    ax.set_ylim(0, 115)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def save_sample_grid(path: str, images: torch.Tensor, labels: torch.Tensor,
                     factors: torch.Tensor, factor_names: Sequence[str], columns: int = 6,
                     title: str = "Biased MNIST samples",
                     aligned: Optional[torch.Tensor] = None,
                     class_names: Optional[Sequence[str]] = None) -> str:
    """A grid of dataset images titled with the label and every bias attribute's value;
    `aligned` (N, F) bool marks the bias-aligned values with * (Biased MNIST: a factor equal
    to the label)."""
    plt = _pyplot()
    count = images.shape[0]
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 3.0 * rows), squeeze=False)
    short = {"digit_color": "dc", "digit_scale": "ds", "digit_position": "dp", "texture": "tx",
             "texture_color": "tc", "letters": "lt", "letter_color": "lc"}
    for i, axis in enumerate(axes.flat):
        axis.set_xticks([]), axis.set_yticks([])
        if i >= count:
            axis.axis("off")
            continue
        axis.imshow(_to_image(images[i]), interpolation="nearest")
        label = int(labels[i])
        marks = [bool(a) for a in aligned[i]] if aligned is not None else [False] * len(factor_names)
        parts = [f"{short.get(n, n)}{'=' if n not in short else ''}{int(v)}{'*' if m else ''}"
                 for n, v, m in zip(factor_names, factors[i], marks)]
        name = class_names[label] if class_names else str(label)
        axis.set_title(f"{name}\n" + " ".join(parts[:4]) + "\n" + " ".join(parts[4:]),
                       fontsize=7)
    note = "  (* = bias-aligned)" if aligned is not None else ""
    fig.suptitle(f"{title}{note}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def _reliability_panel(axis, reliability: Reliability, title: str) -> None:
    bins = len(reliability.counts)
    centres = (np.arange(bins) + 0.5) / bins
    frequency, confidence = _floats(reliability.frequency), _floats(reliability.confidence)
    axis.bar(centres, np.nan_to_num(frequency), width=1 / bins, color="tab:blue",
             edgecolor="white", label="observed")
    # The gap to perfect calibration, from each bin's mean confidence.
    axis.bar(centres, np.nan_to_num(confidence - frequency), bottom=np.nan_to_num(frequency),
             width=1 / bins, color="tab:red", alpha=0.3, label="gap")
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    axis.set_xlim(0, 1), axis.set_ylim(0, 1)
    ece = ("no samples" if not np.isfinite(reliability.ece)
           else f"ECE {100 * reliability.ece:.1f}%")
    axis.set_title(f"{title}\n{ece}", fontsize=8)
    axis.tick_params(labelsize=7)


def save_reliability_diagrams(path: str, diagnostics: Sequence[ExitDiagnostics],
                              title: str = "Reliability per exit") -> str:
    """Per exit (columns): the class softmax's reliability diagram, and the gate's below it
    (p(exit) against the exit being right) when the model has gates. Bars: observed frequency
    per confidence bin; shaded: the gap to the diagonal (perfect calibration)."""
    plt = _pyplot()
    if not diagnostics:
        raise ValueError("no diagnostics to draw: evaluate with diagnostics=True")
    has_gates = any(d.gate_calibration is not None for d in diagnostics)
    rows, columns = (2 if has_gates else 1), len(diagnostics)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.5 * rows), squeeze=False)
    for column, d in enumerate(diagnostics):
        _reliability_panel(axes[0][column], d.class_calibration, f"{d.name} class softmax")
        if has_gates:
            if d.gate_calibration is None:
                axes[1][column].axis("off")
            else:
                _reliability_panel(axes[1][column], d.gate_calibration, f"{d.name} gate")
    axes[0][0].set_ylabel("frequency right", fontsize=8)
    axes[-1][0].set_xlabel("confidence", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def save_comparison_chart(path: str, labels: Sequence[str], means: Sequence[float],
                          stds: Sequence[Optional[float]], kinds: Sequence[str],
                          title: str = "Unbiased test accuracy",
                          every_kind: Sequence[str] = ()) -> str:
    """Horizontal bars of accuracy (shares, drawn in %) with +- std error bars (none where
    std is None: one seed), coloured by `kinds` (the model of each bar). `every_kind`: the
    kinds any chart may show, in colour order, so that a kind has one colour in every chart
    (kinds missing from it follow)."""
    plt = _pyplot()
    order = list(dict.fromkeys([*every_kind, *kinds]))
    palette = {kind: plt.get_cmap("tab10")(order.index(kind)) for kind in dict.fromkeys(kinds)}
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.38 * len(labels)))
    positions = np.arange(len(labels))[::-1]
    errors = 100 * _floats(stds)   # NaN: no bar drawn
    ax.barh(positions, [100 * m for m in means], xerr=errors, capsize=3,
            color=[palette[k] for k in kinds], edgecolor="black", linewidth=0.5)
    for y, mean, error in zip(positions, means, errors):   # past the error bar, not on it
        ax.annotate(f"{100 * mean:.1f}", (100 * mean + np.nan_to_num(error), y),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlabel("accuracy % (" + ("one seed: no error bars" if np.isnan(errors).all()
                                    else "error bars: std over seeds") + ")")
    ax.set_xlim(0, min(100, 100 * max(list(means) + [0.01]) * 1.25 + 5) + np.nanmax(
        np.append(errors, 0)))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    # Outside the axes: at high accuracies "best" had no free corner and covered bars.
    ax.legend(handles, list(palette), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def save_gate_history(path: str, exits: Sequence[ExitHistory], epoch_ends: Sequence[int],
                      title: str = "OccamResNet-18's exits over training") -> str:
    """Six panels, one colour per exit: over the logged training steps, the running training
    accuracy against its tau (dashed), the share of exit targets (solid) and of open gates
    (dotted), the main and gate losses, and whether the gate targets were refreshed; per
    epoch, the share of the validation images leaving at each exit (p_bias 0.5 solid, biased
    dashed) and their accuracy at p_bias 0.5, with chance (10%) dotted. `epoch_ends`: the
    global step at each epoch's end, drawn as grey lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    colours = [plt.get_cmap("tab10")(t) for t in range(len(exits))]
    for e, colour in zip(exits, colours):
        label = f"E{e.exit_index}"
        axes[0, 0].plot(e.steps, 100 * np.asarray(e.train_accuracy), color=colour, label=label)
        axes[0, 0].axhline(100 * e.tau, color=colour, linestyle="--", linewidth=0.8)
        axes[0, 1].plot(e.steps, 100 * np.asarray(e.exit_targets), color=colour, label=label)
        axes[0, 1].plot(e.steps, 100 * np.asarray(e.gate_open), color=colour, linestyle=":")
        axes[0, 2].plot(e.steps, e.main_loss, color=colour, label=f"{label} main")
        axes[0, 2].plot(e.steps, e.gate_loss, color=colour, linestyle="--")
        axes[1, 0].plot(e.epochs, 100 * _floats(e.mixed_share), color=colour, marker="o",
                        label=label)
        axes[1, 0].plot(e.epochs, 100 * _floats(e.val_share), color=colour, linestyle="--")
        axes[1, 1].plot(e.epochs, 100 * _floats(e.mixed_accuracy), color=colour, marker="o",
                        label=label)
        # One lane per exit: up while the targets come from the batch, down while stored.
        axes[1, 2].step(e.steps, e.exit_index + 0.7 * np.asarray(e.refreshing), where="post",
                        color=colour)
    axes[1, 1].axhline(10, color="grey", linewidth=0.8, linestyle=":")
    for axis in [*axes[0], axes[1, 2]]:   # the panels drawn over steps
        for end in epoch_ends:
            axis.axvline(end, color="0.85", linewidth=0.6, zorder=0)
    axes[0, 2].set_yscale("log")
    panels = [(axes[0, 0], "training accuracy % (mean per class;\ntau dashed)", "step"),
              (axes[0, 1], "exit targets % (solid)\nopen gates % (dotted)", "step"),
              (axes[0, 2], "main loss (solid), gate loss (dashed)", "step"),
              (axes[1, 0], "images leaving here %\n(val p_bias 0.5 solid, val dashed)",
               "epoch"),
              (axes[1, 1], "their accuracy % (val p_bias 0.5;\nchance dotted)", "epoch")]
    for axis, ylabel, xlabel in panels:
        if xlabel == "epoch":   # whole epochs: no 1.2, 1.4 ticks on a two-epoch run
            axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.set_ylabel(ylabel, fontsize=8), axis.set_xlabel(xlabel, fontsize=8)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=7, loc="best")
    axes[1, 2].set_yticks([e.exit_index + 0.35 for e in exits],
                          [f"E{e.exit_index}" for e in exits])
    axes[1, 2].set_title("gate targets refreshed (up) or stored (down)", fontsize=8)
    axes[1, 2].set_xlabel("step", fontsize=8), axes[1, 2].tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def _floats(values: Sequence[Optional[float]]) -> np.ndarray:
    """The values as floats, NaN where one is None (matplotlib leaves NaN undrawn)."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _save(fig, path: str, dpi: int) -> str:
    """The figure as a PNG at `path`, written whole or not at all; the figure is closed."""
    plt = _pyplot()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp:
            # "tight": a legend outside the axes, or a title wider than a narrow figure,
            # is kept whole, not cut at the canvas's edge.
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
