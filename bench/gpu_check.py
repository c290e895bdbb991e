"""The Python side of bench/gpu_check.sh: one subcommand per step of a GPU window.

    python bench/gpu_check.py environment  --out OUT [--smoke]
    python bench/gpu_check.py correctness  --out OUT [--smoke] [--jobs N]
    python bench/gpu_check.py sanitize-target [--triton] [--smoke]
    python bench/gpu_check.py native-errors
    python bench/gpu_check.py profile      --out OUT [--smoke]
    python bench/gpu_check.py summary      --out OUT

On a GPU every check runs at the DESIGN.md section 8 shapes; with --smoke (CPU, Triton
interpreted, what `make test` runs) the same code runs at tiny shapes, so it cannot rot
between GPU windows. Each step writes JSON under OUT; `summary` prints the short table last.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch

from benchutils import (DTYPES, EXIT_SHAPES, ONE_PASS_SHAPES, STAGE_SHAPES,
                        exit_head_implementation, exit_head_inputs, exit_head_step, shrink)

# Largest error over the largest reference value, per dtype: fp32 accumulates in fp32 with
# ieee dots; bf16/fp16 outputs are rounded to 8/11 mantissa bits (2^-8, 2^-11) after fp32 sums.
TOLERANCE = {"fp32": 1e-4, "bf16": 1.6e-2, "fp16": 2e-3}


@dataclass
class Check:
    group: str
    case: str
    passed: bool
    errors: Dict[str, float] = field(default_factory=dict)  # output -> max err / max |ref|
    notes: str = ""


def device_for(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; use --smoke on a CPU machine")
    return torch.device("cuda")


def poison(device: torch.device) -> None:
    """Fill the free blocks of the CUDA caching allocator with 0xFF bytes, NaN in fp16, bf16,
    fp32 and fp64 alike (and -1 as an integer), so an output element a kernel never writes
    reads as NaN (torch.empty hands out recycled memory). Both pools: large blocks (> 1 MB)
    and small ones. A no-op on CPU, whose allocator does not cache."""
    if device.type != "cuda":
        return
    free = torch.cuda.mem_get_info(device)[0]
    large = torch.full((min(2 << 30, free // 8),), 255, dtype=torch.uint8, device=device)
    small = [torch.full((1 << 20,), 255, dtype=torch.uint8, device=device) for _ in range(64)]
    del large, small


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in fp64; inf when got has a NaN or inf (poison read)."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    return diff / max(scale, 1e-30)


# ---------------------------------------------------------------------------------------------
# Correctness: exit head


def _fused_forward_backward(h, weight, bias, labels, upstream, device, one_pass=False):
    """([logits, pooled, supp, dh, dW, db], the mask threshold the op saved) of the fused op
    (the op itself, as exit_head calls it, for its threshold); one_pass: its forward, then the
    backward launcher's one-pass candidate (not yet behind the op) with the same upstream."""
    poison(device)
    leaves = [t.detach().requires_grad_(True) for t in (h, weight, bias)]
    *out, threshold = torch.ops.occam.exit_head_fused(*leaves, labels)
    if one_pass:
        from occam_kernels.triton.exit_head import exit_head_backward
        out = [t.detach() for t in out]
        return out + list(exit_head_backward(h, weight, bias, labels, *upstream,
                                             pooled=out[1], threshold=threshold,
                                             one_pass=True)), threshold
    torch.autograd.backward(list(out), upstream)
    return [t.detach() for t in out] + [t.grad for t in leaves], threshold


def _mask_ties(h64, weight64, bias64, labels, threshold):
    """Pixels whose ground-truth CAM lies within fp32 rounding of the threshold (the kernel's
    fp32 CAM may put them on either side), and per sample the KL / P those pixels carry."""
    from occam_kernels import class_activation_maps_reference
    cam = class_activation_maps_reference(h64, weight64, bias64).flatten(2)     # (B, K, P)
    cam_true = cam[torch.arange(cam.shape[0], device=cam.device), labels]        # (B, P)
    finite = torch.where(torch.isfinite(threshold), threshold, torch.zeros_like(threshold))
    scale = finite.abs()[:, None] + cam_true.abs().amax(dim=1, keepdim=True)
    ties = torch.isfinite(threshold)[:, None] & ((cam_true - finite[:, None]).abs() <= 1e-5 * scale)
    kl = torch.logsumexp(cam, dim=1) - cam.mean(dim=1) - math.log(cam.shape[1])
    return ties, (ties * kl).sum(dim=1) / cam.shape[2]


def check_exit_head(batch, shape, num_classes, dtype_name, layout, device, seed=0,
                    one_pass=False) -> Check:
    """Fused forward+backward against the fp64 reference, twice (bitwise equal), poisoned;
    one_pass: with the one-pass backward candidate instead of the op's two kernels."""
    from occam_kernels import exit_head_reference
    dtype = DTYPES[dtype_name]
    h, weight, bias, labels, upstream = exit_head_inputs(batch, shape, num_classes, dtype,
                                                         layout, device, seed)
    first, saved_threshold = _fused_forward_backward(h, weight, bias, labels, upstream, device,
                                                     one_pass)
    second, _ = _fused_forward_backward(h, weight, bias, labels, upstream, device, one_pass)
    bitwise = all(torch.equal(a, b) for a, b in zip(first, second))
    # The kernels mask against their own logits rounded to h's dtype (+inf for one pixel, and
    # kept within the ground-truth CAM's range): the reference is given the threshold the op
    # saves for backward, so a rounding-level difference cannot flip pixels.
    threshold = saved_threshold.double()
    leaves = [t.detach().double().requires_grad_(True) for t in (h, weight, bias)]
    want = exit_head_reference(*leaves, labels, threshold=threshold)
    torch.autograd.backward(list(want), [g.double() for g in upstream])
    want = [t.detach() for t in want] + [t.grad for t in leaves]
    ties, supp_slack = _mask_ties(*(t.detach() for t in leaves), labels, threshold)
    got = list(first)
    # A tied pixel may fall either way in fp32: its dh column is not compared, and supp may
    # differ by that pixel's KL / P.
    got[3], want[3] = (t.masked_fill(ties.view(t.shape[0], 1, *t.shape[2:]), 0.0)
                       for t in (got[3].double(), want[3]))
    excess = ((got[2].double() - want[2]).abs() - supp_slack).clamp(min=0)
    got[2] = want[2] + excess
    names = ["logits", "pooled", "supp", "dh", "dW", "db"]
    errors = {name: relative_error(g, ref) for name, g, ref in zip(names, got, want)}
    # Autograd hands h.grad the strides of h whatever the op returns: ask the op itself.
    grad_h = first[3] if one_pass else torch.ops.occam.exit_head_fused_backward(
        h, weight, bias, labels, first[1], saved_threshold, *upstream)[0]
    strides_kept = grad_h.stride() == h.stride()
    passed = bitwise and strides_kept and all(e <= TOLERANCE[dtype_name] for e in errors.values())
    notes = ("" if bitwise else "not bitwise repeatable; ") + \
        ("" if strides_kept else "dh lost h's layout; ") + \
        (f"{int(ties.sum())} tied pixels" if ties.any() else "")
    case = f"B={batch} {'x'.join(map(str, shape))} K={num_classes} {dtype_name} {layout}"
    return Check("one_pass" if one_pass else "exit_head", case, passed, errors,
                 notes.strip("; "))


def check_cams(batch, shape, num_classes, dtype_name, layout, device) -> Check:
    import occam_kernels
    from occam_kernels import class_activation_maps_reference
    h, weight, bias, _, _ = exit_head_inputs(batch, shape, num_classes, DTYPES[dtype_name],
                                             layout, device, seed=1)
    poison(device)
    got = occam_kernels.class_activation_maps(h, weight, bias, backend="triton")
    want = class_activation_maps_reference(h.double(), weight.double(), bias.double())
    error = relative_error(got, want)
    case = f"B={batch} {'x'.join(map(str, shape))} K={num_classes} {dtype_name} {layout}"
    return Check("cam", case, error <= TOLERANCE[dtype_name], {"cam": error})


# ---------------------------------------------------------------------------------------------
# Correctness: compaction and early-exit inference


def check_compact(x, keep, backend, label, device) -> Check:
    import occam_kernels
    index = torch.arange(x.shape[0], device=device) * 3 + 1
    poison(device)
    got, got_index = occam_kernels.compact(x, keep, index, backend=backend)
    want, want_index = x[keep], index[keep]
    same = (got.shape == want.shape and torch.equal(got, want)
            and torch.equal(got_index, want_index))
    layout_kept = (not x.is_contiguous(memory_format=torch.channels_last) or x.dim() != 4
                   or x.is_contiguous() or backend == "reference"
                   or got.is_contiguous(memory_format=torch.channels_last))
    return Check("compact", f"{backend} {label}", same and layout_kept,
                 notes="" if layout_kept else "channels_last lost")


def compaction_checks(device, smoke) -> List[Check]:
    backends = ["reference", "triton"] + (["cpu"] if device.type == "cpu" else ["cuda"])
    generator = torch.Generator().manual_seed(2)
    checks = []
    batch = 8 if smoke else 256
    for shape in STAGE_SHAPES:
        shape = shrink(shape, smoke)
        for dtype_name in ("fp32", "bf16"):
            for layout in ("contiguous", "channels_last"):
                x = torch.randn(batch, *shape, generator=generator).to(device, DTYPES[dtype_name])
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                keep = (torch.rand(batch, generator=generator) < 0.5).to(device)
                label = f"B={batch} {'x'.join(map(str, shape))} {dtype_name} {layout}"
                checks += [check_compact(x, keep, b, label, device) for b in backends]
    rows = 600 if smoke else 70_001  # more rows than a CUDA grid's y dimension holds
    for trailing, dtype_name in (((3,), "fp32"), ((8, 2, 2), "bf16")):
        x = torch.randn(rows, *trailing, generator=generator).to(device, DTYPES[dtype_name])
        if len(trailing) == 3:
            x = x.contiguous(memory_format=torch.channels_last)
        for pattern, keep in (("random", torch.rand(rows, generator=generator) < 0.3),
                              ("all", torch.ones(rows, dtype=torch.bool)),
                              ("none", torch.zeros(rows, dtype=torch.bool))):
            label = f"{rows} rows {'x'.join(map(str, trailing))} {dtype_name} keep={pattern}"
            checks += [check_compact(x, keep.to(device), b, label, device) for b in backends]
    return checks


def predict_checks(device, smoke) -> List[Check]:
    """early_exit() with compaction equals every exit on every sample, then selection, with the
    exits forced to take 40/30/30% of the batch (thresholds far from every sample)."""
    from benchutils import force_exit_distribution, near_a_threshold, true_fp32
    from occamnets.models import occam_resnet18
    torch.manual_seed(0)
    width, size, batch = (4, 32, 16) if smoke else (58, 160, 64)
    model = occam_resnet18(10, width=width, stem="3x3" if smoke else "7x7").to(device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    # A compacted batch may run other cuDNN algorithms; with TF32 their fp32 results would
    # differ by ~1e-3, without it by rounding only.
    with true_fp32():
        near = near_a_threshold(model, force_exit_distribution(model, x, (0.4, 0.3, 0.3)))
        full = model.early_exit(x, compaction=False)
        checks = []
        for backend in (["cpu", "triton"] if device.type == "cpu" else ["cuda", "triton"]):
            got = model.early_exit(x, compaction=True, compaction_backend=backend)
            differ = got.exit_index != full.exit_index
            same = ~differ
            error = relative_error(got.logits[same], full.logits[same])
            counts = got.exit_counts.tolist()
            passed = (not (differ & ~near).any() and error <= 1e-4
                      and all(c > 0 for c in counts[model.first_inference_exit:]))
            notes = (f"{int(differ.sum())} exit indices differ" if differ.any() else "") + \
                (f"; {int(near.sum())} samples near a threshold" if near.any() else "")
            checks.append(Check("predict", f"{backend} compaction B={batch} exits {counts}",
                                passed, {"logits": error}, notes.strip("; ")))
    return checks


# ---------------------------------------------------------------------------------------------
# Correctness: offsets past 2^31


def large_index_checks(device, smoke) -> List[Check]:
    """B*H*W and K*H*W beyond 2^31 (int32 offsets would wrap): the last samples and the last
    classes, where the offsets are largest, against the fp64 reference of just those."""
    import occam_kernels
    from occam_kernels import class_activation_maps_reference, exit_head_reference
    checks = []
    # exit head: B * P = 520 * 2048^2 > 2^31, fp16 (4.4 GB of h, 17 GB of fp32 statistics)
    batch, side = (3, 5) if smoke else (520, 2048)
    generator = torch.Generator(device=device).manual_seed(4)
    h = torch.rand(batch, 1, side, side, device=device, generator=generator,
                   dtype=torch.float16)
    weight = torch.randn(10, 1, device=device, dtype=torch.float16)
    bias = torch.randn(10, device=device, dtype=torch.float16) * 0.1
    labels = torch.arange(batch, device=device) % 10
    grad_supp = torch.zeros(batch, device=device, dtype=torch.float16)
    # Only the last two samples reach dW, so their reference is the whole dW. Scaled with P:
    # dh is about g_supp / P, and at 1 / 2048^2 it would be below fp16's smallest step.
    grad_supp[-2:] = max(1.0, side * side / 1024)
    leaves = [t.requires_grad_(True) for t in (h, weight, bias)]
    out = occam_kernels.exit_head(*leaves, labels, backend="triton")
    out.supp.backward(grad_supp)
    tail = slice(batch - 2, batch)
    ref_leaves = [t.detach()[tail].double().requires_grad_(True) if i == 0 else
                  t.detach().double().requires_grad_(True) for i, t in enumerate((h, weight, bias))]
    threshold = out.logits.detach()[tail].gather(1, labels[tail, None])[:, 0].double()
    want = exit_head_reference(*ref_leaves, labels[tail], threshold=threshold)
    want[2].backward(grad_supp[tail].double())
    errors = {"supp": relative_error(out.supp[tail], want[2]),
              "logits": relative_error(out.logits[tail], want[0]),
              "dh": relative_error(leaves[0].grad[tail], ref_leaves[0].grad),
              "dW": relative_error(leaves[1].grad, ref_leaves[1].grad),
              "db": relative_error(leaves[2].grad, ref_leaves[2].grad)}
    span = batch * side * side
    checks.append(Check("large_index", f"exit_head B*H*W={span:,} fp16",
                        all(e <= TOLERANCE["fp16"] for e in errors.values()), errors,
                        "" if span > 2 ** 31 else "smoke: stays below 2^31"))
    del h, leaves, out, grad_supp
    # CAM: K * P = 1000 * 1470^2 > 2^31 in one sample
    classes, side = (7, 5) if smoke else (1000, 1470)
    h = torch.rand(1, 16, side, side, device=device, dtype=torch.float16)
    weight = torch.randn(classes, 16, device=device, dtype=torch.float16) / 4
    bias = torch.randn(classes, device=device, dtype=torch.float16)
    cam = occam_kernels.class_activation_maps(h, weight, bias, backend="triton")
    want = class_activation_maps_reference(h.double(), weight[-3:].double(), bias[-3:].double())
    error = relative_error(cam[:, -3:], want)
    span = classes * side * side
    checks.append(Check("large_index", f"cam K*H*W={span:,} fp16", error <= TOLERANCE["fp16"],
                        {"cam": error}, "" if span > 2 ** 31 else "smoke: stays below 2^31"))
    return checks


# ---------------------------------------------------------------------------------------------
# The correctness step: cases in worker processes (Triton compiles in parallel on a GPU host)


def _exit_head_group(args):
    """One (dtype, layout, K) group of exit-head and CAM cases: the kernels' specialisations
    are shared inside a group, so one process compiles each once."""
    dtype_name, layout, num_classes, smoke = args
    device = device_for(smoke)
    batch = 2 if smoke else 128
    shapes = EXIT_SHAPES if num_classes == 10 else [EXIT_SHAPES[0], EXIT_SHAPES[2]]
    checks, done = [], set()
    for shape in shapes:
        small = shrink(shape, smoke)
        if small in done:  # the smoke shrinks two C=464 shapes to one: the same inputs again
            continue
        done.add(small)
        checks.append(check_exit_head(batch, small, num_classes, dtype_name, layout, device))
        checks.append(check_cams(batch, small, num_classes, dtype_name, layout, device))
        if shape in ONE_PASS_SHAPES and num_classes == 10:
            checks.append(check_exit_head(batch, small, num_classes, dtype_name, layout, device,
                                          one_pass=True))
    return checks


def _other_group(args):
    name, smoke = args
    run = compaction_checks if name == "compact" else predict_checks
    return run(device_for(smoke), smoke)


def _large_index_group(smoke):
    return large_index_checks(device_for(smoke), smoke)


def _run_guarded(task):
    """A task's checks as dicts; a crash is a failed check with its reason, not a lost step.
    The task's cached GPU memory is released: up to 8 workers share one GPU."""
    function, args = task
    try:
        checks = function(args)
    except Exception as error:
        checks = [Check("crash", f"{function.__name__}{args}", False,
                        notes=f"{type(error).__name__}: {error}"[:500])]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [asdict(check) for check in checks]


def _report(results, out, final=False) -> None:
    """Rewrite correctness.json (after every task: a timeout keeps what finished)."""
    with open(os.path.join(out, "correctness.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    if not final:
        return
    for result in results:
        worst = max(result["errors"].values(), default=0.0)
        print(f"{'ok  ' if result['passed'] else 'FAIL'} {result['group']:<11} "
              f"{result['case']:<48} worst err {worst:.1e} {result['notes']}")


def correctness(out: str, smoke: bool, jobs: int) -> int:
    # Many classes: past one 64-class block, the last one partial. 150 in the smoke mode takes
    # the same path as 1000 for a seventh of the interpreter's time (its K=1000 groups took
    # 131 of the step's 177 s on a 2-core CPU).
    many_classes = 150 if smoke else 1000
    tasks = [(_exit_head_group, (d, layout, k, smoke)) for k in (10, many_classes)
             for d in DTYPES for layout in ("contiguous", "channels_last")]
    # 17 <= K <= 64 in bf16/fp16: one class block of 32 or 64 (the backward's SINGLE_K
    # variant at that width, Hopper's wgmma for the CAM dot), compiled apart from K=10's.
    tasks += [(_exit_head_group, (d, "channels_last", 40, smoke)) for d in ("bf16", "fp16")]
    tasks += [(_other_group, ("compact", smoke)), (_other_group, ("predict", smoke))]
    results = []
    if jobs > 1:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_run_guarded, task) for task in tasks]
            for done in concurrent.futures.as_completed(futures):
                results += done.result()
                _report(results, out)
    else:
        for task in tasks:
            results += _run_guarded(task)
            _report(results, out)
    # Alone, after the workers have gone: it needs about 30 GB.
    results += _run_guarded((_large_index_group, smoke))
    _report(results, out, final=True)
    failed = [r for r in results if not r["passed"]]
    print(f"correctness: {len(results) - len(failed)}/{len(results)} passed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# compute-sanitizer target, profile, environment, summary


def sanitize_target(smoke: bool, triton: bool) -> int:
    """A small run for compute-sanitizer: every compaction pattern on the CUDA op (or, with
    --triton, the Triton exit head and compaction), checked against the reference."""
    import occam_kernels
    device = device_for(smoke)
    checks = []
    generator = torch.Generator().manual_seed(5)
    for batch, shape, layout in ((37, (5, 3, 4), "contiguous"), (9, (6, 5, 3), "channels_last"),
                                 (1, (3,), "contiguous"), (0, (4,), "contiguous"),
                                 (3000, (7,), "contiguous")):
        x = torch.randn(batch, *shape, generator=generator).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for keep in (torch.rand(batch, generator=generator) < 0.5,
                     torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)):
            backend = "triton" if triton else ("cpu" if smoke else "cuda")
            checks.append(check_compact(x, keep.to(device), backend, f"{batch} rows", device))
    if triton:
        for shape, classes, dtype_name in (((5, 3, 7), 10, "fp32"), ((6, 4, 3), 70, "bf16")):
            checks.append(check_exit_head(3, shape, classes, dtype_name, "contiguous", device))
        # the one-pass backward candidate, its padding lanes (C = 5 of 16, P = 21 of 32) too
        checks.append(check_exit_head(3, (5, 3, 7), 10, "bf16", "channels_last", device,
                                      one_pass=True))
    failed = [c for c in checks if not c.passed]
    what = "Triton" if triton else "CUDA compaction"
    print(f"sanitize target: {len(checks) - len(failed)}/{len(checks)} checks passed ({what}, "
          f"backends {occam_kernels.build_info()['backends']})")
    return 1 if failed else 0


NATIVE_ERRORS_TEST = "tests/test_compact.py::test_native_op_checks_inputs_itself"


def native_errors() -> int:
    """The C++ compact op's own input checks, alone in a process. On the H200 (2026-11-27,
    torch 2.11) two of them crashed the process with SIGSEGV instead of raising, which also
    ended the kernel-test step; after a crash, the first frames under cuda-gdb say where."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", NATIVE_ERRORS_TEST]
    done = subprocess.run(command)
    if done.returncode >= 0:
        return 0 if done.returncode == 0 else 1
    print(f"native-errors: the test process died of signal {-done.returncode}")
    if shutil.which("cuda-gdb") is None:
        print("native-errors: no cuda-gdb here for a backtrace")
        return 1
    trace = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 16", "--args"]
                           + command, capture_output=True, text=True, timeout=150)
    lines = trace.stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if "received signal" in line), 0)
    print("\n".join(line[:400] for line in lines[first:first + 20]))
    return 1


def profile(out: str, smoke: bool) -> int:
    """Per-kernel device times of the fused exit head, forward+backward, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device = device_for(smoke)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    results, timing = {}, {}
    for shape in (EXIT_SHAPES[0], EXIT_SHAPES[4]):
        for dtype_name in ("bf16", "fp32"):
            batch, small = (2, shrink(shape, True)) if smoke else (128, shape)
            h, weight, bias, labels, upstream = exit_head_inputs(
                batch, small, 10, DTYPES[dtype_name], "channels_last", device, seed=6)
            step = exit_head_step(exit_head_implementation("fused"), h, weight, bias, labels,
                                  upstream)

            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            iterations = 2 if smoke else 20
            # Wall time of the same steps without the profiler: on the H200 the benchmarks'
            # wall times were 8 times the kernels' device time, so both are recorded.
            started = time.perf_counter()
            for _ in range(iterations):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall_us = (time.perf_counter() - started) / iterations * 1e6
            with torch_profile(activities=activities) as prof:
                for _ in range(iterations):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            rows, host = [], []
            for event in prof.key_averages():
                if event.device_type == DeviceType.CPU and event.self_cpu_time_total > 0:
                    host.append({"op": event.key, "calls": event.count // iterations,
                                 "self_us_per_step": event.self_cpu_time_total / iterations})
                if device.type == "cuda":
                    # Kernels only: a CPU op's device time includes its children's kernels.
                    # (user annotations, such as inductor's ranges, are mirrored on the GPU
                    # timeline as CUDA rows spanning their kernels: not kernels themselves)
                    if (event.device_type != DeviceType.CUDA
                            or getattr(event, "is_user_annotation", False)):
                        continue
                    total = getattr(event, "device_time_total", None)
                    if total is None:
                        total = getattr(event, "cuda_time_total", 0)
                else:
                    # CPU (smoke): the custom ops, which run the interpreted kernels
                    total = event.cpu_time_total if event.key.startswith("occam::") else 0
                if total > 0:
                    rows.append({"kernel": event.key, "calls": event.count // iterations,
                                 "us_per_step": total / iterations})
            rows.sort(key=lambda r: -r["us_per_step"])
            name = f"B={batch} {'x'.join(map(str, small))} {dtype_name} channels_last fwd+bwd"
            results[name] = rows[:12]
            host.sort(key=lambda r: -r["self_us_per_step"])
            measured = sum(row["us_per_step"] for row in rows)
            timing[name] = {"wall_us_per_step": wall_us, "profiled_us_per_step": measured,
                            "host_ops": host[:10]}
            print(f"-- {name} ({'device' if device.type == 'cuda' else 'CPU'} time per step)")
            for row in rows[:12]:
                print(f"   {row['us_per_step']:10.1f} us  x{row['calls']:<3} {row['kernel'][:80]}")
            print(f"   wall {wall_us:.1f} us per step without the profiler; the rows above "
                  f"and the rest: {measured:.1f} us. Host self time, the largest ops:")
            for row in host[:6]:
                print(f"   {row['self_us_per_step']:10.1f} us  x{row['calls']:<3} "
                      f"{row['op'][:80]}")
    with open(os.path.join(out, "profile.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(out, "profile_wall.json"), "w") as handle:
        json.dump(timing, handle, indent=1)
    return 0


def environment(out: str, smoke: bool) -> int:
    import triton
    import occam_kernels
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": smoke, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "build": occam_kernels.build_info()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=list(torch.cuda.get_device_capability()),
                    memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        info.update(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    with open(os.path.join(out, "environment.json"), "w") as handle:
        json.dump(info, handle, indent=1)
    print(json.dumps(info, indent=1))
    return 0


def _read_json(path, default):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def _headlines(bench_paths) -> List[str]:
    """One line per benchmark group: each implementation's median and its ratio to the
    group's baseline (bench/report.py's choice of baseline)."""
    from report import BASELINES, load, suite_of
    runs = load([p for p in bench_paths if os.path.exists(p)])
    groups: Dict[str, list] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    lines = []
    for group, members in sorted(groups.items()):
        baseline = next((r for r in members if r["impl"] == BASELINES.get(suite_of(group))), None)
        parts = []
        for run in sorted(members, key=lambda r: r["impl"]):
            text = f"{run['impl']} {run['median'] * 1e3:.3f} ms"
            if run["extra"].get("images"):
                text += f" ({run['extra']['images'] / run['median']:.0f} img/s)"
            if run["impl"] == "copy":
                text += f" ({run['extra']['floor_bytes'] / run['median'] / 1e9:.0f} GB/s)"
            if baseline is not None and run is not baseline:
                text += f" {baseline['median'] / run['median']:.2f}x"
            parts.append(text)
        lines.append(f"{group}: " + " | ".join(parts))
    return lines


def _device_time_lines(record) -> List[str]:
    """The device-time step in a few lines: the baselines, the bf16 exit head per shape (graph
    and stream time of each implementation), the backward candidate, the training step and
    its probes, early exit per distribution against its ceilings, and issue 16's targets met
    or missed."""
    from report import (baselines_line, compact_targets, device_time_index, early_exit_rows,
                        early_exit_summary, early_exit_targets, exit_head_targets, fmt_us,
                        training_targets)
    if not record:
        return []
    lines = [f"device time: {baselines_line(record['baselines'])}"]
    index = device_time_index(record)
    table = index.get(("exit_head", "bf16", "channels_last"), {})
    for shape, impls in table.items():
        parts = [f"{impl} {fmt_us(t.get('graph_us'))}/{fmt_us(t.get('stream_us'))}"
                 for impl, t in impls.items()]
        lines.append(f"  exit head {shape} bf16 graph/stream us: " + ", ".join(parts))
    for (part, dtype, _), backward in index.items():
        if part == "backward":  # the one-pass candidate against the two kernels
            lines += [f"  backward {shape} {dtype} graph/stream us: " + ", ".join(
                f"{name.replace('_', ' ')} {fmt_us(impls.get(name, {}).get('graph_us'))}/"
                f"{fmt_us(impls.get(name, {}).get('stream_us'))}"
                for name in ("two_kernels", "one_pass")) for shape, impls in backward.items()]
    lines += [f"  training {t['dtype']} {t['impl']} width {t.get('width')}"
              + (" cudnn.benchmark" if t.get("cudnn_benchmark") else "")
              + f": stream/host/busy {fmt_us(t.get('stream_us'))}/{fmt_us(t.get('host_us'))}/"
              f"{fmt_us(t.get('device_busy_us'))} us, host syncs "
              f"{fmt_us(t.get('host_syncs_profiler'))}"
              for t in record["timings"] if t["part"] == "training"]
    lines += [f"  early exit {early_exit_summary(row)}" for row in early_exit_rows(record)]
    if record["settings"].get("smoke"):   # tiny shapes on the CPU: the targets are the GPU's
        lines.append("  issue 16's targets below: computed from a CPU smoke run, not verdicts")
    return lines + exit_head_targets(record) + compact_targets(record) \
        + training_targets(record) + early_exit_targets(record)


def summary(out: str) -> int:
    """The short table, printed last, and OUT/summary.json with everything it was made from."""
    env = _read_json(os.path.join(out, "environment.json"), {})
    steps = []
    if os.path.exists(os.path.join(out, "steps.tsv")):
        with open(os.path.join(out, "steps.tsv")) as handle:
            for line in handle:
                name, status, seconds, limit = line.rstrip("\n").split("\t")
                steps.append({"step": name, "status": status, "seconds": int(seconds),
                              "limit": int(limit)})
    checks = _read_json(os.path.join(out, "correctness.json"), [])
    by_group: Dict[str, List[int]] = {}
    for check in checks:
        passed_total = by_group.setdefault(check["group"], [0, 0])
        passed_total[0] += check["passed"]
        passed_total[1] += 1
    bench_paths = [os.path.join(out, name) for name in sorted(os.listdir(out))
                   if name.startswith("bench_") and name.endswith(".json")]
    from report import trim  # bench/ is on sys.path: this file runs from there
    for path in bench_paths:
        trim(path)  # per-round timings would make the JSON too large to come back
    headlines = _headlines(bench_paths)
    device_time = _device_time_lines(_read_json(os.path.join(out, "device_time.json"), None))
    record = {"environment": env, "steps": steps, "device_time": device_time,
              "correctness": {g: {"passed": p, "total": t} for g, (p, t) in by_group.items()},
              "failed_checks": [c for c in checks if not c["passed"]],
              "headlines": headlines, "profile": _read_json(os.path.join(out, "profile.json"), {})}
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    print(f"\n== gpu_check on {env.get('device', '?')}: torch {env.get('torch', '?')}, triton "
          f"{env.get('triton', '?')}, {env.get('date', '?')}"
          f"{' (smoke: CPU, tiny shapes, not speed claims)' if env.get('smoke') else ''}")
    print(f"{'step':<18}{'status':<10}{'seconds':>8}{'limit':>7}")
    for step in steps:
        print(f"{step['step']:<18}{step['status']:<10}{step['seconds']:>8}{step['limit']:>7}")
    print("correctness: " + (", ".join(f"{g} {p}/{t}" for g, (p, t) in sorted(by_group.items()))
                             or "no results"))
    for check in record["failed_checks"][:10]:
        print(f"  FAILED {check['group']} {check['case']} {check['errors']} {check['notes']}")
    for line in headlines + device_time:
        print(line)
    skipped = [s["step"] for s in steps if s["status"] == "skipped"]
    ran = [s for s in steps if s["status"] != "skipped"]
    bad = [s for s in ran if s["status"] != "pass"]
    print(f"{len(ran) - len(bad)}/{len(ran)} steps passed"
          + (f"; not passed: {', '.join(s['step'] + ' (' + s['status'] + ')' for s in bad)}"
             if bad else "")
          + (f"; skipped on request: {', '.join(skipped)}" if skipped else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["environment", "correctness", "sanitize-target",
                                         "native-errors", "profile", "summary"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--jobs", type=int, default=None,
                        help="correctness worker processes (default: 8 on GPU, 1 on CPU)")
    parser.add_argument("--triton", action="store_true",
                        help="sanitize-target: the Triton kernels instead of the CUDA op")
    args = parser.parse_args(argv)
    started = time.time()
    if args.step == "environment":
        code = environment(args.out, args.smoke)
    elif args.step == "correctness":
        jobs = args.jobs or (1 if args.smoke else min(8, os.cpu_count() or 1))
        code = correctness(args.out, args.smoke, jobs)
    elif args.step == "sanitize-target":
        code = sanitize_target(args.smoke, args.triton)
    elif args.step == "native-errors":
        code = native_errors()
    elif args.step == "profile":
        code = profile(args.out, args.smoke)
    else:
        return summary(args.out)  # the table is the last thing printed
    print(f"[{args.step}: {time.time() - started:.1f} s]")
    return code


if __name__ == "__main__":
    sys.exit(main())
