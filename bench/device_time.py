"""Device time of the exit head and the compaction, beside the wall time per call.

    python bench/device_time.py --out OUT [--smoke] [--jobs N]
                                [--parts exit_head,compact,training,backward,inference]

Window 1 (H200, bench/NOTES.md) timed every exit-head implementation at 1.6 to 3.0 ms per
synchronised call, at sizes 20 times apart, against 0.36 ms of kernels: the wall clock
measured a per-call cost, not the kernels. Here each case is timed five ways:

  wall     one call, then a synchronisation; the median over calls (what pytest-benchmark times)
  stream   N calls back to back between two CUDA events, one synchronisation at the end: the
           cost per call when the host runs ahead (the larger of host and device work)
  host     the host's time to issue one call in that loop
  graph    one call captured in a CUDA graph and replayed N times between events: device time
           with the host taken out (gaps between kernels stay in)
  kernels  torch.profiler: device busy time per call, kernels per call, and host
           synchronisations per call (CUDA runtime calls that block the host)

and once per run: an empty synchronisation, a one-element kernel with a synchronisation, the
copy bandwidth (a 1 GiB copy, events), and a check that the profiler counts one host sync
for one .item(). The exit head's floor is 4 x bytes(h) (DESIGN.md section 3); its achieved
bandwidth is floor / graph time, against the copy's. The exit head runs forward+backward with
fixed upstream gradients, returned by autograd.grad (no loss kernels of its own, no copy into
.grad: benchutils.exit_head_step), channels_last (the training layout on a GPU) for every
implementation and contiguous for the fused one too; the fused head's times include its
input checks (the label check's few small kernels), part of the op. torch.compile cases are
compiled first in --jobs worker processes (a 90 s deadline), which fill inductor's and
Triton's on-disk caches; each is then timed here alone, loading from them.

The training part times one whole training step (forward, OccamLoss, backward, Adam) of
the end-to-end benchmark's OccamResNet-18 (bench/benchutils.py: 160 px, B=128, width 58,
channels_last), the fused heads in bf16 autocast and in fp32, beside the official code's step
(its OccamTrainer's training_step, contiguous, as it runs) when OCCAM_OFFICIAL names a
checkout, for issue 16's target (ours >= 5x the official's in bf16); the profiler's host syncs
per step tell a host-bound step from a device-bound one. Two probes of window 1's bf16 step
(slower than fp32 there, 41.5 against 30.3 ms): the same step at width 64, every channel count
a multiple of 8 (at 58 none is: 58, 116, 232, 464), and at width 58 with
torch.backends.cudnn.benchmark on (off in `occamnets train` and the official code). No graph:
Adam keeps its step counts on the host. Fewer calls per method (Settings.training_calls):
a step takes tens of milliseconds.

The backward part times the Triton backward launcher alone (its saved logits and pooled given)
where the one-pass candidate can run (C = 58 at K = 10): the two kernels it uses by default
against `one_pass=True`, one read of h instead of two. Its floor is 2 x bytes(h) (h read once,
dh written once).

The inference part times what decides issue 16's early-exit target, in fp32 as the end-to-end
benchmark runs it (bench/bench_end_to_end.py, its model and forced exit distributions): the
whole early_exit call with and without compaction per distribution (a graph for full depth
only: compaction reads its counts on the host), and each inference segment (the stem and the
stages before the first inference exit; then stage t with exit t) alone, at the full batch
and at every batch size compaction leaves it at those distributions. Each records its FLOPs
(bench/inference_ceiling.py), so bench/report.py can set the measured speed-up beside two
ceilings: FLOPs, and the segments' device times summed as compaction would run them (no
compaction, no host).

OUT/device_time.json is rewritten after every case (a timeout keeps what finished);
bench/report.py renders it. --smoke: CPU, tiny shapes, Triton interpreted (`make test`);
its times say that the code runs, nothing about speed.
"""
import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchutils import (BATCH, COMPACT_IMPLEMENTATIONS, DISTRIBUTIONS, DTYPES, EXIT_SHAPES,
                        NUM_CLASSES, ON_GPU, ONE_PASS_SHAPES, SIZE, STAGE_SHAPES, STEM, WIDTH,
                        count_host_syncs, distribution_shares, environment,
                        exit_head_implementation, exit_head_inputs, exit_head_step,
                        inference_model, inference_work, occam_inference_call,
                        occam_training_call, official_training_call, shrink, synchronize)
from benchutils import device as benchutils_device  # device_time's own `device` is an argument
from inference_ceiling import active_counts, counts_from_shares, early_exit_work

EXIT_HEAD_BATCH, CLASSES, COMPACT_BATCH, KEEP_RATIO = 128, 10, 256, 0.5
PARTS = ("exit_head", "compact", "training", "backward", "inference")
# The end-to-end benchmarks' images: channels_last on a GPU (benchutils.images_and_labels).
END_TO_END_LAYOUT = "channels_last" if ON_GPU else "contiguous"
# The training step: ours with the fused exit heads (the Triton backend), or the official
# code's step (bench/official_code.py).
TRAINING_BACKENDS = {"fused": "triton"}
OFFICIAL = "official"
# The width whose every channel count is a multiple of 8 (cuDNN's bf16 tensor-core kernels
# want that): 64 on a GPU, where the paper's 58 gives 58, 116, 232 and 464.
ALIGNED_WIDTH = -(-WIDTH // 8) * 8
# The backward launcher's two forms: exit_head_backward(..., one_pass=...)
BACKWARD_VARIANTS = {"two_kernels": False, "one_pass": True}
# CUDA runtime and driver calls that block the host until the device catches up.
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cuStreamSynchronize", "cuCtxSynchronize", "cuMemcpyDtoH_v2"}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Case:
    part: str                     # "exit_head", "compact", "training", "backward",
                                  # "inference" or "segment"
    impl: str                     # exit head: fused/eager/compiled; compact: COMPACT_IMPLEMENTATIONS;
                                  # training: TRAINING_BACKENDS or OFFICIAL;
                                  # backward: BACKWARD_VARIANTS; inference: compaction/full_depth;
                                  # segment: segment_names()
    shape: Tuple[int, ...]        # (C, H, W) at the section-8 size (the smoke run shrinks it);
                                  # the images' for training, inference and segment
    dtype: str                    # training: "bf16" is autocast, "fp32" none
    layout: str = "channels_last"
    distribution: Optional[str] = None   # inference: a benchutils.DISTRIBUTIONS name
    batch: Optional[int] = None          # segment: the samples it runs on
    width: Optional[int] = None          # training: the model's width (WIDTH when None)
    cudnn_benchmark: bool = False        # training: torch.backends.cudnn.benchmark in the step

    @property
    def name(self) -> str:
        extra = (f" {self.distribution}" if self.distribution else "") + (
            f" batch {self.batch}" if self.batch is not None else "") + (
            f" width {self.width}" if self.width is not None else "") + (
            " cudnn.benchmark" if self.cudnn_benchmark else "")
        return (f"{self.part} {'x'.join(map(str, self.shape))} {self.dtype} {self.layout} "
                f"{self.impl}{extra}")


@dataclass
class Timing:
    """One case's numbers, in microseconds per call; None where a method had no number (the
    reason is in `errors`)."""
    part: str
    impl: str
    shape: List[int]              # the shape timed, batch first
    dtype: str
    layout: str
    floor_bytes: int              # the least bytes a call must move (see the module doc)
    setup_seconds: float          # inputs, first call (compiles), warm-up
    wall_us: Optional[float] = None
    stream_us: Optional[float] = None
    host_us: Optional[float] = None
    graph_us: Optional[float] = None
    device_busy_us: Optional[float] = None
    device_ops_per_call: Optional[float] = None   # kernels, copies and memsets
    host_syncs_profiler: Optional[float] = None
    host_syncs_torch: Optional[int] = None
    peak_bytes: Optional[int] = None
    flops: Optional[float] = None                 # inference and segment: work per call
    distribution: Optional[str] = None            # inference: its DISTRIBUTIONS name
    exit_counts: Optional[List[int]] = None       # inference: per exit, zero below the first
    width: Optional[int] = None                   # training: the model's width
    cudnn_benchmark: Optional[bool] = None        # training: cudnn.benchmark in the step
    errors: Dict[str, str] = field(default_factory=dict)


@dataclass
class Baselines:
    empty_sync_us: Optional[float] = None          # torch.cuda.synchronize() on an idle device
    tiny_kernel_sync_us: Optional[float] = None    # one-element add, then synchronize
    copy_bytes: int = 0                            # read + write of one copy
    copy_us: Optional[float] = None                # per copy, between events
    copy_gb_per_s: Optional[float] = None
    # Blocking CUDA calls the profiler counts around an empty step (its own frame), and then
    # for one .item() less that: 1 when the counting works.
    profiler_syncs_for_nothing: Optional[float] = None
    profiler_syncs_for_one_item: Optional[float] = None


@dataclass
class Settings:
    smoke: bool
    calls: int          # per method: wall calls, stream calls, graph replays
    profiled_calls: int
    exit_head_batch: int
    compact_batch: int
    classes: int
    keep_ratio: float
    training_calls: Optional[int] = None   # per method for a training step (None: `calls`)


@dataclass
class DeviceTimeRecord:
    date: str
    environment: Dict[str, str]
    settings: Settings
    baselines: Baselines
    timings: List[Timing]
    format: int = FORMAT_VERSION
    kind: str = "device_time"


@dataclass
class Built:
    """A case made ready to time: the call, the shape it reads (batch first), its floor."""
    step: Callable[[], object]
    shape: List[int]
    floor_bytes: int                              # 0 where no floor is defined
    flops: Optional[float] = None
    exit_counts: Optional[List[int]] = None


# ---------------------------------------------------------------------------------------------
# Timing methods. Each works on CPU (the smoke run) where it can, with the host clock.


def _median_wall_us(step: Callable[[], None], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _stream_us(step: Callable[[], None], calls: int, device: torch.device) -> Tuple[float, float]:
    """(per call between events, host issue time per call) over `calls` back-to-back calls."""
    synchronize()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - started) / calls * 1e6
    if device.type != "cuda":
        return host, host
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls, host


def _graph_us(step: Callable[[], None], replays: int, device: torch.device) -> float:
    """Device time per call: the call captured once in a CUDA graph, replayed between events.
    Warmed up on a side stream first, as capture needs (autograd's accumulators, cuBLAS)."""
    if device.type != "cuda":
        raise RuntimeError("no CUDA graphs on CPU")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Captured on the warm-up's stream: handles created per stream (cuBLAS) already exist.
    with torch.cuda.graph(graph, stream=side):
        step()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    elapsed = start.elapsed_time(end) * 1e3 / replays
    del graph
    return elapsed


def _profiled(step: Callable[[], None], calls: int, device: torch.device,
              sync_offset: float = 0.0) -> Dict[str, float]:
    """Per call: device busy time and device operations (kernels, copies, memsets), and
    blocking host calls less `sync_offset`, the count the profiler's own frame adds (measured
    on an empty step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
    busy = operations = syncs = 0.0
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False):
            continue  # a range (inductor's, say) mirrored on the GPU timeline: not device work
        if event.device_type == DeviceType.CUDA:
            total = getattr(event, "device_time_total", None)
            busy += total if total is not None else getattr(event, "cuda_time_total", 0)
            operations += event.count
        elif event.key in SYNC_CALLS:
            syncs += event.count
    return {"device_busy_us": busy / calls, "device_ops_per_call": operations / calls,
            "host_syncs_profiler": (syncs - sync_offset) / calls}


def _peak_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(step: Callable[[], None], timing: Timing, settings: Settings, device: torch.device,
            sync_offset: float, not_capturable: Optional[str] = None,
            calls: Optional[int] = None, profiled_calls: Optional[int] = None) -> Timing:
    """Every method on one warmed-up step; a method that fails records why and the rest go on.
    `not_capturable`: why no CUDA graph can hold the step (then none is tried)."""
    calls = calls or settings.calls
    profiled_calls = profiled_calls or settings.profiled_calls

    def attempt(method: str, run: Callable[[], None]) -> None:
        try:
            run()
        except Exception as error:  # recorded, never fatal: one method must not lose the case
            timing.errors[method] = f"{type(error).__name__}: {error}"[:300]
            try:
                synchronize()
            except Exception:
                pass

    def wall():
        timing.wall_us = _median_wall_us(step, calls)

    def stream():
        timing.stream_us, timing.host_us = _stream_us(step, calls, device)

    def graph():
        if not_capturable:
            raise RuntimeError(f"not capturable: {not_capturable}")
        timing.graph_us = _graph_us(step, calls, device)

    def profiled():
        for key, value in _profiled(step, profiled_calls, device, sync_offset).items():
            setattr(timing, key, value)

    def torch_syncs():
        timing.host_syncs_torch = count_host_syncs(step)

    def peak():
        timing.peak_bytes = _peak_bytes(step, device)

    for method, run in (("wall", wall), ("stream", stream), ("profile", profiled),
                        ("torch_syncs", torch_syncs), ("peak", peak), ("graph", graph)):
        attempt(method, run)
    return timing


# ---------------------------------------------------------------------------------------------
# Cases


def _exit_head_case_inputs(case: Case, smoke: bool, device: torch.device):
    """(h, weight, bias, labels, upstream) of an exit-head or backward case."""
    return exit_head_inputs(2 if smoke else EXIT_HEAD_BATCH, shrink(case.shape, smoke), CLASSES,
                            DTYPES[case.dtype], case.layout, device, seed=7)


def _exit_head_step(case: Case, smoke: bool, device: torch.device):
    h, weight, bias, labels, upstream = _exit_head_case_inputs(case, smoke, device)
    step = exit_head_step(exit_head_implementation(case.impl, smoke), h, weight, bias, labels,
                          upstream)
    # DESIGN.md section 3: h read twice forward, once backward, dh written once.
    return Built(step, list(h.shape), 4 * h.numel() * h.element_size())


def _backward_step(case: Case, smoke: bool, device: torch.device):
    from occam_kernels.triton.exit_head import exit_head_backward, exit_head_forward
    h, weight, bias, labels, upstream = _exit_head_case_inputs(case, smoke, device)
    _, pooled, _, threshold = exit_head_forward(h, weight, bias, labels)
    one_pass = BACKWARD_VARIANTS[case.impl]

    def step():
        exit_head_backward(h, weight, bias, labels, *upstream, pooled=pooled,
                           threshold=threshold, one_pass=one_pass)
    # h read once, dh written once
    return Built(step, list(h.shape), 2 * h.numel() * h.element_size())


def _compact_step(case: Case, smoke: bool, device: torch.device):
    batch = 8 if smoke else COMPACT_BATCH
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(batch, *shrink(case.shape, smoke), generator=generator)
    x = x.to(device, DTYPES[case.dtype])
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    keep = (torch.rand(batch, generator=generator) < KEEP_RATIO).to(device)
    index = torch.arange(batch, device=device)
    fn = COMPACT_IMPLEMENTATIONS[case.impl]

    def step():
        fn(x, keep, index)

    kept = int(keep.sum())
    # read the kept rows once and write them once
    return Built(step, list(x.shape), 2 * kept * x[0].numel() * x.element_size())


def segment_names() -> List[str]:
    """The stem with the stages before the first inference exit, then stage t with exit t."""
    work = inference_work()
    first = work.first_inference_exit
    return (["+".join(["stem"] + [f"stage{t}" for t in range(first)])]
            + [f"stage{t}+E{t}" for t in range(first, work.num_exits)])


def segment_batches(distributions) -> List[List[int]]:
    """Per segment, the batch sizes it runs at under compaction at these distributions (and
    the full batch), largest first."""
    work = inference_work()
    sizes = [{BATCH} for _ in segment_names()]
    for name in distributions:
        counts = counts_from_shares(BATCH, distribution_shares(name)[0],
                                    work.first_inference_exit, work.num_exits)
        for i, active in enumerate(active_counts(BATCH, counts, work.first_inference_exit)):
            if active:
                sizes[i + 1].add(active)
    return [sorted(s, reverse=True) for s in sizes]


def _check_model_device(device: torch.device) -> None:
    if device.type != benchutils_device().type:
        raise RuntimeError(f"the training, inference and segment parts run where "
                           f"bench/benchutils puts its model ({benchutils_device()}), not on "
                           f"{device}")


def _training_step(case: Case, smoke: bool, device: torch.device):
    _check_model_device(device)
    if case.impl == OFFICIAL:
        checkout = os.environ.get("OCCAM_OFFICIAL")
        if not checkout:
            raise RuntimeError("the official step needs a checkout of erobic/occam-nets-v1: "
                               "set OCCAM_OFFICIAL (bench/NOTES.md)")
        step = official_training_call(checkout, case.dtype)
    else:
        step = occam_training_call(TRAINING_BACKENDS[case.impl], case.dtype,
                                   case.width or WIDTH, case.cudnn_benchmark)
    return Built(step, [BATCH, 3, SIZE, SIZE], 0)


def _inference_step(case: Case, smoke: bool, device: torch.device):
    _check_model_device(device)
    call, counts = occam_inference_call(case.impl == "compaction",
                                        distribution_shares(case.distribution)[0])
    work = inference_work()
    flops = (BATCH * work.full_depth if case.impl == "full_depth"
             else early_exit_work(work, BATCH, counts))
    return Built(call, [BATCH, 3, SIZE, SIZE], 0, flops=flops, exit_counts=counts)


@lru_cache(maxsize=None)
def _segment_model():
    return inference_model()  # one model for every segment case: its gates are not forced


@lru_cache(maxsize=None)
def _segment_inputs(segment: int, batch: int):
    """The inference model and what segment `segment` reads at `batch` samples."""
    model, x = _segment_model()
    first = model.first_inference_exit
    with torch.no_grad():
        features = x[:batch]
        if segment > 0:
            features = model.stem(features)
            for t in range(first + segment - 1):
                features = model.stages[t](features)
    return model, features


def _segment_step(case: Case, smoke: bool, device: torch.device):
    _check_model_device(device)
    segment = segment_names().index(case.impl)
    model, features = _segment_inputs(segment, case.batch)
    work = inference_work()
    first = model.first_inference_exit

    @torch.no_grad()
    def step():
        if segment == 0:
            out = model.stem(features)
            for t in range(first):
                out = model.stages[t](out)
            return out
        t = first + segment - 1
        return model.exits[t](model.stages[t](features))

    flops = case.batch * ([work.before] + work.exits)[segment]
    return Built(step, list(features.shape), 0, flops=flops)


def time_case(case: Case, settings: Settings, device: torch.device,
              sync_offset: float) -> Timing:
    started = time.perf_counter()
    build = {"exit_head": _exit_head_step, "compact": _compact_step,
             "training": _training_step, "backward": _backward_step,
             "inference": _inference_step, "segment": _segment_step}[case.part]
    built = build(case, settings.smoke, device)
    # Compiles and autotuning stay out of the timings. The smoke's one call per method needs
    # one warm-up (aot_eager compiles in it; the interpreter has nothing to tune), and each of
    # its interpreted training steps takes seconds.
    for _ in range(1 if settings.smoke else 3):
        built.step()
    synchronize()
    timing = Timing(case.part, case.impl, built.shape, case.dtype, case.layout,
                    built.floor_bytes, setup_seconds=round(time.perf_counter() - started, 2),
                    flops=built.flops, distribution=case.distribution,
                    exit_counts=built.exit_counts)
    if case.part == "training":
        timing.width = case.width or WIDTH
        timing.cudnn_benchmark = case.cudnn_benchmark
        return measure(built.step, timing, settings, device, sync_offset,
                       "Adam keeps its step counts on the host",
                       calls=settings.training_calls,
                       profiled_calls=min(2, settings.profiled_calls))
    # Compaction reads its count on the host (DESIGN.md section 4), and so does early_exit
    # with compaction: no graph can hold them. Full depth reads nothing on the host.
    syncs = case.part == "compact" or (case.part == "inference" and case.impl == "compaction")
    return measure(built.step, timing, settings, device, sync_offset,
                   "the call synchronises with the host" if syncs else None)


def cases(parts: List[str],
          distributions: Tuple[str, ...] = tuple(DISTRIBUTIONS),
          official: bool = True) -> List[Case]:
    """In the order they matter, so a timeout loses the least: the bf16 exit head (the
    issue's targets), the compaction, the training step, the backward candidate, early-exit
    inference, the fp32 exit head, the fused head contiguous. `official`: whether the
    training part includes the official code's step."""
    chosen: List[Case] = []
    if "exit_head" in parts:
        chosen += [Case("exit_head", impl, shape, "bf16") for shape in EXIT_SHAPES
                   for impl in ("fused", "eager", "compiled")]
    if "compact" in parts:
        chosen += [Case("compact", impl, shape, dtype) for dtype in ("bf16", "fp32")
                   for shape in STAGE_SHAPES for impl in COMPACT_IMPLEMENTATIONS]
    if "training" in parts:
        chosen += training_cases(official)
    if "backward" in parts:
        chosen += [Case("backward", impl, shape, dtype) for dtype in ("bf16", "fp32")
                   for shape in ONE_PASS_SHAPES for impl in BACKWARD_VARIANTS]
    if "inference" in parts:
        chosen += inference_cases(list(distributions))
    if "exit_head" in parts:
        chosen += [Case("exit_head", impl, shape, "fp32") for shape in EXIT_SHAPES
                   for impl in ("fused", "eager", "compiled")]
        chosen += [Case("exit_head", "fused", shape, dtype, "contiguous")
                   for dtype in ("bf16", "fp32") for shape in EXIT_SHAPES]
    return chosen


def training_cases(official: bool) -> List[Case]:
    """Ours fused and the official step, bf16 then fp32; then the two probes of our bf16 step:
    every channel count a multiple of 8, and cuDNN's own benchmarking on."""
    image = (3, SIZE, SIZE)
    chosen = []
    for dtype in ("bf16", "fp32"):
        chosen.append(Case("training", "fused", image, dtype, END_TO_END_LAYOUT))
        if official:
            chosen.append(Case("training", OFFICIAL, image, dtype, "contiguous"))
    return chosen + [
        Case("training", "fused", image, "bf16", END_TO_END_LAYOUT, width=ALIGNED_WIDTH),
        Case("training", "fused", image, "bf16", END_TO_END_LAYOUT, cudnn_benchmark=True)]


def inference_cases(distributions: List[str]) -> List[Case]:
    """The whole early_exit call per distribution, full depth then compaction, then every
    segment at the batch sizes those distributions give it."""
    image = (3, SIZE, SIZE)
    chosen = [Case("inference", impl, image, "fp32", END_TO_END_LAYOUT, distribution=name)
              for name in distributions for impl in ("full_depth", "compaction")]
    for name, batches in zip(segment_names(), segment_batches(distributions)):
        chosen += [Case("segment", name, image, "fp32", END_TO_END_LAYOUT, batch=batch)
                   for batch in batches]
    return chosen


def _no_local_autotune() -> None:
    """Inductor keeps the configs its runtime autotuner picks on disk; picked in workers that
    share the GPU they could be the wrong ones. Off in the workers and in the timing process
    alike (the setting is part of the compile cache's key), so each process tunes for itself,
    uncontended, in its warm-up calls."""
    import torch._inductor.config as inductor_config
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = False


def _compile_one(case: Case, smoke: bool) -> Tuple[str, float, str]:
    """In a worker: one forward+backward of a compiled case, which writes its kernels to the
    on-disk caches the timing process then reads."""
    started = time.perf_counter()
    try:
        _no_local_autotune()
        device = torch.device("cpu" if smoke else "cuda")
        _exit_head_step(case, smoke, device).step()
        synchronize()
        return case.name, time.perf_counter() - started, ""
    except Exception as error:
        return case.name, time.perf_counter() - started, f"{type(error).__name__}: {error}"[:300]


def warm_compile_caches(compiled: List[Case], jobs: int, smoke: bool,
                        deadline_seconds: float) -> None:
    """Compile `compiled` in `jobs` worker processes (in order: the first cases timed first)
    within `deadline_seconds`; then the workers are ended, finished or not. A case not warmed
    here compiles in the timing process when its turn comes: slower, never wrong."""
    if jobs <= 1 or not compiled:
        return
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    # Each worker's inductor compiles with a pool of its own: 4 processes each, not one per
    # core, on a host whose cores all workers share (not part of the cache key).
    added = "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ
    if added:
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "4"
    pool = context.Pool(jobs)  # the workers start here, with the environment above
    if added:
        del os.environ["TORCHINDUCTOR_COMPILE_THREADS"]
    warmed = answered = 0
    try:
        results = pool.imap(partial(_compile_one, smoke=smoke), compiled)
        for _ in compiled:
            left = deadline_seconds - (time.perf_counter() - started)
            # A worker that crashed never answers: the deadline ends the wait for it too.
            name, seconds, error = results.next(timeout=max(left, 0.1))
            answered += 1
            warmed += not error
            print(f"  compiled {name} in {seconds:.1f} s {error}".rstrip())
    except multiprocessing.TimeoutError:
        print(f"  compile warm-up stopped at its {deadline_seconds:.0f} s deadline")
    except Exception as error:  # a broken pool must not lose the timings
        print(f"  compile warm-up failed: {type(error).__name__}: {error}"[:300])
    finally:
        if answered == len(compiled):
            pool.close()       # all done: the workers leave on their own
        else:
            pool.terminate()   # still compiling (or hung): ended
        pool.join()
    print(f"compile caches warmed: {warmed} of {len(compiled)} cases on {jobs} workers in "
          f"{time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------------------------------------
# Baselines


def baselines(settings: Settings, device: torch.device) -> Baselines:
    result = Baselines()
    calls = settings.calls * 4
    if device.type == "cuda":
        _profiled(lambda: None, 1, device)  # the first session sets the profiler up: not counted
        result.empty_sync_us = _median_wall_us(lambda: None, calls)
        tiny = torch.zeros(1, device=device)
        result.tiny_kernel_sync_us = _median_wall_us(lambda: tiny.add_(1), calls)
        result.profiler_syncs_for_nothing = _profiled(lambda: None, 1, device)[
            "host_syncs_profiler"]
        probe = torch.ones(8, device=device)
        result.profiler_syncs_for_one_item = _profiled(
            lambda: probe.sum().item(), 1, device, result.profiler_syncs_for_nothing)[
                "host_syncs_profiler"]
    elements = (4 if settings.smoke else 256) * 2 ** 20  # fp32: 1 GiB on a GPU
    source = torch.ones(elements, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    result.copy_bytes = 2 * source.numel() * source.element_size()
    result.copy_us = _stream_us(lambda: target.copy_(source), settings.calls, device)[0]
    result.copy_gb_per_s = result.copy_bytes / result.copy_us / 1e3
    return result


# ---------------------------------------------------------------------------------------------


def _write(record: DeviceTimeRecord, out: str) -> None:
    path = os.path.join(out, "device_time.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(asdict(record), handle, indent=1)
    os.replace(path + ".tmp", path)


def _line(timing: Timing) -> str:
    def us(value):
        return "-" if value is None else f"{value:9.1f}"
    # The batch matters where it varies (segments) or is the whole point (inference).
    shape = timing.shape if timing.part in ("inference", "segment") else timing.shape[1:]
    impl = f"{timing.impl} {timing.distribution or ''}" + (
        f"w{timing.width}" if timing.width else "") + (
        " cudnn.bm" if timing.cudnn_benchmark else "")
    return (f"{timing.part:<9} {'x'.join(map(str, shape)):<9} {timing.dtype:<4} "
            f"{timing.layout:<13} {impl:<20} wall {us(timing.wall_us)} stream "
            f"{us(timing.stream_us)} host {us(timing.host_us)} graph {us(timing.graph_us)} "
            f"busy {us(timing.device_busy_us)} us"
            + (f"  [{'; '.join(f'{k}: {v}' for k, v in timing.errors.items())}]"[:240]
               if timing.errors else ""))


def run(out: str, smoke: bool, jobs: int, parts: List[str]) -> int:
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("device_time: no CUDA device is visible; use --smoke on a CPU machine")
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # Without it every Triton case fails, some with "0 active drivers" (gpu_check.sh sets it)
        raise SystemExit("device_time: --smoke runs the Triton kernels on the CPU under their "
                         "interpreter: run it as TRITON_INTERPRET=1 python bench/device_time.py "
                         "--smoke ...")
    os.makedirs(out, exist_ok=True)
    # The smoke: one call per method (its times mean nothing; an interpreted training step
    # takes about 5 s).
    settings = Settings(smoke=smoke, calls=1 if smoke else 50, profiled_calls=1 if smoke else 5,
                        exit_head_batch=2 if smoke else EXIT_HEAD_BATCH,
                        compact_batch=8 if smoke else COMPACT_BATCH, classes=CLASSES,
                        keep_ratio=KEEP_RATIO, training_calls=1 if smoke else 10)
    official = bool(os.environ.get("OCCAM_OFFICIAL"))
    if "training" in parts and not official:
        print("device_time: the official training step is left out: OCCAM_OFFICIAL names no "
              "checkout of erobic/occam-nets-v1 (bench/NOTES.md)")
    if smoke:  # one shape per part and dtype, one distribution: the code paths, not the numbers
        # The training step: the first of ours (about 5 s a step interpreted) and the
        # official's; the probes differ from it only in their arguments.
        chosen = [c for c in cases(parts, ("trained",), official)
                  if c.part in ("inference", "segment")
                  or (c.part == "training" and c.dtype == "bf16" and c.width is None
                      and not c.cudnn_benchmark)
                  or c.shape in (EXIT_SHAPES[0], STAGE_SHAPES[0])]
    else:
        chosen = cases(parts, official=official)
    _no_local_autotune()
    warm_compile_caches([c for c in chosen if c.impl == "compiled"], jobs, smoke,
                        deadline_seconds=90.0)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = DeviceTimeRecord(now, environment(), settings, baselines(settings, device), [])
    _write(record, out)
    print(f"baselines: {asdict(record.baselines)}")
    failed = 0
    for case in chosen:
        try:
            timing = time_case(case, settings, device,
                               record.baselines.profiler_syncs_for_nothing or 0.0)
        except Exception as error:  # a case that cannot even be built is a row with its reason
            timing = Timing(case.part, case.impl, list(case.shape), case.dtype, case.layout, 0,
                            0.0, errors={"setup": f"{type(error).__name__}: {error}"[:300]})
        if timing.stream_us is None:
            failed += 1
        record.timings.append(timing)
        _write(record, out)
        print(_line(timing))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device_time: {len(chosen) - failed}/{len(chosen)} cases timed")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes that compile the torch.compile cases first "
                             "(default: 4 on a GPU, 1 on CPU)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    jobs = args.jobs if args.jobs is not None else (1 if args.smoke else 4)
    return run(args.out, args.smoke, jobs, parts)


if __name__ == "__main__":
    sys.exit(main())
