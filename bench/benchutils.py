"""Helpers shared by the benchmark suites.

On a GPU every case is timed at the shapes of DESIGN.md section 8. Without one (CI, `make
test`) each case runs once at scaled-down shapes, with Triton under its interpreter, so the
suites cannot rot; run them with --benchmark-disable there.
"""
import contextlib
import json
import os
from functools import lru_cache, partial
from typing import Optional

import torch

from inference_ceiling import counts_from_shares, segment_work
from occamnets.environment import device_name

ON_GPU = torch.cuda.is_available()

# DESIGN.md section 8: OccamResNet-18's exit shapes (C, H, W) at 160 px, then at 64 px; the
# stage outputs (160 px) are what compaction moves.
EXIT_SHAPES_160 = [(58, 40, 40), (116, 20, 20), (232, 10, 10), (464, 5, 5)]
EXIT_SHAPES_64 = [(58, 64, 64), (116, 32, 32), (232, 16, 16), (464, 8, 8)]
EXIT_SHAPES = EXIT_SHAPES_160 + EXIT_SHAPES_64
STAGE_SHAPES = EXIT_SHAPES_160
# Where the one-pass backward candidate fits at K = 10 (triton.exit_head.one_pass_fits: one
# tile of channels, C <= 64): the C = 58 exits, the largest maps.
ONE_PASS_SHAPES = [shape for shape in EXIT_SHAPES if shape[0] <= 64]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@contextlib.contextmanager
def true_fp32():
    """Convolutions and matmuls in fp32 rather than TF32 (cuDNN's default for convolutions on
    a GPU), so two fp32 paths compared inside differ by rounding only."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def environment() -> dict:
    import triton
    return {
        "device": device_name(device()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


class CompiledForOneCase:
    """torch.compile of `fn` for one benchmark case, which refuses to be timed as eager.

    Each case gets a fresh compile (dynamo state reset first): one compiled object shared by
    many shapes hits dynamo's recompile limit and silently falls back to eager. fullgraph=True
    makes a graph break an error; the first call must add a graph, and every later call runs
    under the "fail_on_recompile" stance, so a call that would recompile (or run eager)
    raises."""

    def __init__(self, fn, backend: str):
        torch._dynamo.reset()
        self.compiled = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)
        self.warm = False

    def __call__(self, *args, **kwargs):
        if not self.warm:
            from torch._dynamo.utils import counters
            graphs = counters["stats"]["unique_graphs"]
            out = self.compiled(*args, **kwargs)
            if counters["stats"]["unique_graphs"] <= graphs:
                raise RuntimeError("torch.compile produced no graph for this case: timing it "
                                   "would report eager as compiled")
            self.warm = True
            return out
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.compiled(*args, **kwargs)


def run_case(benchmark, fn, extra: dict) -> None:
    """Time `fn` (which synchronises) after a warm-up, and record the environment and the
    peak memory of one call in extra_info."""
    fn()  # warm-up: compilation and autotuning stay out of the timing
    synchronize()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(extra)
    benchmark.extra_info["peak_memory_bytes"] = peak
    benchmark.extra_info["smoke"] = not ON_GPU
    benchmark(fn)


def group_name(case: str, ran: Optional[str] = None) -> str:
    """A benchmark's group: the design case on a GPU; on the CPU the case marked as a smoke
    run, with the shape that ran, so that `pytest-benchmark compare` of a CPU and a GPU file
    never ranks a tiny CPU case beside the GPU's as the same one."""
    if ON_GPU:
        return case
    return f"{case} (CPU smoke{': ' + ran if ran else ''})"


def shrink(shape, smoke: bool):
    """A section-8 (C, H, W) shape, or a tiny one with the same aspect for a CPU smoke run."""
    if not smoke:
        return shape
    channels, height, width = shape
    return max(1, channels // 29), max(1, height // 8), max(1, width // 8)


def exit_head_inputs(batch, shape, num_classes, dtype, layout, device, seed):
    """h (after a ReLU, in `layout`), weight, bias, labels and the three upstream gradients
    (logits, pooled, supp) of one exit-head case, drawn on the CPU from `seed`."""
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(batch, channels, height, width, generator=generator))
    h = h.to(device, dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(num_classes, channels, generator=generator) / channels ** 0.5)
    bias = torch.randn(num_classes, generator=generator) * 0.1
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    upstream = (torch.randn(batch, num_classes, generator=generator),
                torch.randn(batch, channels, generator=generator),
                torch.rand(batch, generator=generator) + 0.5)
    return (h, weight.to(device, dtype), bias.to(device, dtype), labels.to(device),
            [g.to(device, dtype) for g in upstream])


def exit_head_step(fn, h, weight, bias, labels, upstream):
    """One forward+backward of exit-head implementation `fn` (h, weight, bias, labels) ->
    (logits, pooled, supp), with the given upstream gradients, so no loss kernels of its own
    are timed with it. The gradients are returned by autograd.grad, not accumulated into
    .grad: that would copy a gradient whose strides differ from h's (the reference's, for a
    channels_last h) into h's layout, a copy of h's size that training (where h is not a
    leaf) does not make."""
    leaves = [t.detach().requires_grad_(True) for t in (h, weight, bias)]

    def step():
        out = fn(*leaves, labels)
        torch.autograd.grad(list(out), leaves, upstream)

    return step


def exit_head_implementation(name: str, smoke: bool = not ON_GPU):
    """The exit head by implementation name: "fused" (Triton), "eager" (the reference) or
    "compiled", a fresh torch.compile of the reference that raises rather than time eager
    (inductor on a GPU; aot_eager in a CPU smoke run, which only proves the path runs)."""
    import occam_kernels
    # The reference's formula without its input checks (a labels pass on the device): the
    # baselines are the math as a user writes it, as they were timed before the checks.
    from occam_kernels.reference import exit_head_unchecked
    if name == "fused":
        return partial(occam_kernels.exit_head, backend="triton")
    if name == "eager":
        return exit_head_unchecked
    return CompiledForOneCase(exit_head_unchecked, "aot_eager" if smoke else "inductor")


def _compact_occam(x, keep, index):
    import occam_kernels
    return occam_kernels.compact(x, keep, index)


def _compact_occam_triton(x, keep, index):
    import occam_kernels
    return occam_kernels.compact(x, keep, index, backend="triton")


def _compact_nonzero_index_select(x, keep, index):
    rows = keep.nonzero().squeeze(1)
    return x.index_select(0, rows), index.index_select(0, rows)


# Compaction, ours and the two ways PyTorch has: name -> fn(x, keep, index) -> (kept, index).
COMPACT_IMPLEMENTATIONS = {
    "occam": _compact_occam,
    "occam_triton": _compact_occam_triton,
    "boolean_mask": lambda x, keep, index: (x[keep], index[keep]),
    "nonzero_index_select": _compact_nonzero_index_select,
}


def count_host_syncs(fn) -> int:
    """Synchronising CUDA calls made through PyTorch in one call of fn, from
    torch.cuda.set_sync_debug_mode (0 on CPU, where nothing syncs). The C++ compaction reads
    its count with .item(), which is seen; a raw cudaStreamSynchronize would not be."""
    if not ON_GPU:
        return 0
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------
# End to end: the model and input of the training-step and inference suites

# GPU: the paper's model and input; CPU: a narrow 64 px-stem model on tiny images (smoke).
WIDTH, SIZE, BATCH = (58, 160, 128) if ON_GPU else (4, 16, 4)
STEM = "7x7" if ON_GPU else "3x3"
NUM_CLASSES = 10
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def trained_distribution():
    """Exit shares (E1, E2, E3) of a trained OccamResNet on the unbiased test set: from the
    report named by OCCAM_BENCH_REPORT, else the demo's, else the copy kept in the repo
    (bench/trained_exit_distribution.json, written by `python bench/bench_end_to_end.py
    REPORT`)."""
    for path in (os.environ.get("OCCAM_BENCH_REPORT"),
                 os.path.join(BENCH_DIR, "..", "runs", "demo", "occam", "report.json"),
                 os.path.join(BENCH_DIR, "trained_exit_distribution.json")):
        if path and os.path.isfile(path):
            with open(path) as handle:
                data = json.load(handle)
            kept = data["test"] if "test" in data else data
            if "first_inference_exit" not in kept:
                continue  # written before reports named the first exit used at inference
            return tuple(kept["exit_share"][kept["first_inference_exit"]:]), path
    raise FileNotFoundError("no trained exit distribution: run `make demo` or set "
                            "OCCAM_BENCH_REPORT to a report.json")


def images_and_labels(batch=BATCH):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=generator).to(device())
    if ON_GPU:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device())


def _autocast(precision: str):
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=precision == "bf16")


def occam_training_call(backend: str, precision: str, width: int = WIDTH,
                        cudnn_benchmark: bool = False):
    """One training step of our OccamResNet-18 as `occamnets train` runs it on this device
    (channels_last on a GPU), with OccamLoss and Adam, not synchronised: exit heads `backend`
    ("triton" fused, or "reference"), `precision` "fp32" or "bf16" (autocast), at `width`
    (the paper's 58 by default), with torch.backends.cudnn.benchmark on during the step if
    asked (otherwise as set: off by default, as in `occamnets train` and the official code)."""
    from occamnets.losses import OccamLoss
    from occamnets.models import occam_resnet18
    torch.manual_seed(0)
    model = occam_resnet18(NUM_CLASSES, width=width, stem=STEM, backend=backend).to(device())
    if ON_GPU:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = OccamLoss(num_items=BATCH, num_classes=NUM_CLASSES).to(device())
    loss_fn.on_epoch_start(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    x, labels = images_and_labels()
    items = torch.arange(BATCH, device=device())
    autocast = _autocast(precision)

    def step():
        with autocast:
            out = model(x, labels)
            loss, _ = loss_fn(out, labels, items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if not cudnn_benchmark:
        return step

    def benchmarked_step():  # the flag is global: on for this step only
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            step()
        finally:
            torch.backends.cudnn.benchmark = saved

    return benchmarked_step


def official_model(checkout: str):
    """The official occam_resnet18 (erobic/occam-nets-v1, imported from `checkout`) at the
    benchmarks' width, seed 0, on this device: the 7x7 stem at 160 px on a GPU, its 64 px
    variant (3x3 stem) at the CPU smoke sizes."""
    from official_code import import_official
    official = import_official(checkout, "models.occam_resnet")
    builder = official.occam_resnet18 if STEM == "7x7" else official.occam_resnet18_img64
    torch.manual_seed(0)
    # A fresh exits_kwargs dict: the builder fills in the one it is given.
    return builder(NUM_CLASSES, width=WIDTH, exits_kwargs={}).to(device())


def official_training_call(checkout: str, precision: str):
    """One training step of the official code, not synchronised: its OccamTrainer's
    training_step (Lightning's loop left out) on official_model(), then Adam, on the
    benchmarks' batch in the default layout (as Lightning hands it over), at epoch 1 from
    batch 1 on (epoch 0, batch 0 made the losses and set every gate target)."""
    from official_code import official_training_step
    model = official_model(checkout)
    driver = official_training_step(checkout, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    x, labels = images_and_labels()
    batch = {"x": x.contiguous(), "y": labels, "item_ix": torch.arange(BATCH, device=device())}
    autocast = _autocast(precision)

    def step(batch_idx=1):
        with autocast:
            loss = driver.training_step(batch, batch_idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batch_idx=0)
    driver.current_epoch = 1
    return step


def synchronised(call):
    """`call` followed by a synchronisation: what pytest-benchmark times."""
    def step():
        call()
        synchronize()
    return step


def occam_training_step(backend: str, precision: str):
    """occam_training_call, synchronised."""
    return synchronised(occam_training_call(backend, precision))


# Exit distributions of the inference benchmarks: shares of the batch per inference exit
# (E1, E2, E3); "trained" is read by trained_distribution().
DISTRIBUTIONS = {"all_E1": (1.0, 0.0, 0.0), "50_30_20": (0.5, 0.3, 0.2),
                 "none_early": (0.0, 0.0, 1.0), "trained": None}


def distribution_shares(name: str):
    """(shares, source) of a named distribution: source "forced", or the trained report's path."""
    if DISTRIBUTIONS[name] is None:
        return trained_distribution()
    return DISTRIBUTIONS[name], "forced"


def inference_model():
    """The inference benchmarks' OccamResNet-18 (random weights, seed 0), in eval mode, and
    its batch of images."""
    from occamnets.models import occam_resnet18
    torch.manual_seed(0)
    model = occam_resnet18(NUM_CLASSES, width=WIDTH, stem=STEM).to(device()).eval()
    return model, images_and_labels()[0]


@lru_cache(maxsize=None)
def inference_work():
    """FLOPs per sample of each inference segment of inference_model()'s architecture
    (inference_ceiling.SegmentWork), counted on a CPU twin with the reference heads."""
    from occamnets.models import occam_resnet18
    twin = occam_resnet18(NUM_CLASSES, width=WIDTH, stem=STEM, backend="reference").eval()
    return segment_work(twin, SIZE)


def occam_inference_call(compaction: bool, shares):
    """One early-exit inference of inference_model() on its batch, its gates forced so the
    inference exits take `shares` of it; with or without compaction; not synchronised.
    Returns the call and the exit counts."""
    model, x = inference_model()
    force_exit_distribution(model, x, shares)
    counts = model.early_exit(x).exit_counts.tolist()
    return partial(model.early_exit, x, compaction=compaction), counts


def occam_inference_step(compaction: bool, shares):
    """occam_inference_call, synchronised (what pytest-benchmark times): (step, exit counts)."""
    call, counts = occam_inference_call(compaction, shares)
    return synchronised(call), counts


class ForcedGate(torch.nn.Module):
    """A gate that fires (logit +30, p = 1.0 in fp32) when the sum of a sample's pooled
    features reaches a threshold, and otherwise gives logit -30.

    Thresholds are set from a full-depth pass so the exits take a chosen share of the batch;
    the decision is a function of the sample alone, so compaction sees the same choice.
    """

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, pooled):
        fires = pooled.float().sum(1) >= self.threshold
        return torch.where(fires, 30.0, -30.0)


def gate_scores(model, x):
    """Per exit, each sample's ForcedGate score (the sum of its pooled features)."""
    with torch.no_grad():
        return [e.pooled.float().sum(1) for e in model(x).exits]


@torch.no_grad()
def force_exit_distribution(model, x, shares):
    """Replace the gates of the inference exits before the last (E1..E(last-1) by default) so
    that the i-th of them takes about shares[i] * B of x (inference_ceiling.counts_from_shares
    gives the exact counts).

    Each threshold lies halfway between the scores of the last sample taken and the first one
    left, so no sample sits near a threshold: a compacted batch, whose features may differ
    from the full batch's in the last bits, makes the same decisions. Returns the full-depth
    scores, which near_a_threshold reads."""
    scores = gate_scores(model, x)
    remaining = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    counts = counts_from_shares(x.shape[0], shares, model.first_inference_exit, model.num_exits)
    for t in range(model.first_inference_exit, model.num_exits - 1):
        candidates = scores[t][remaining].sort(descending=True).values
        count = counts[t]
        if count == 0:
            threshold = float("inf")
        elif count == len(candidates):
            threshold = float("-inf")
        else:
            threshold = ((candidates[count - 1] + candidates[count]) / 2).item()
        model.exits[t].gate = ForcedGate(threshold)
        remaining &= scores[t] < threshold
    return scores


def near_a_threshold(model, scores, relative=1e-4):
    """(B,) bool: samples whose score (from force_exit_distribution) lies within `relative` of
    a forced threshold, whose decision rounding could flip (there should be none)."""
    near = torch.zeros_like(scores[0], dtype=torch.bool)
    for t in range(model.first_inference_exit, model.num_exits - 1):
        threshold = model.exits[t].gate.threshold
        if abs(threshold) != float("inf"):
            near |= (scores[t] - threshold).abs() <= relative * (abs(threshold) + 1)
    return near
