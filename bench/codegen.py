"""What a CPU can say about the GPU code: every Triton kernel compiled ahead of time for sm_90.

    python bench/codegen.py [--out bench/CODEGEN.md] [--json PATH] [--quick]

No GPU is needed. The real launchers (occam_kernels/triton/*.py) run on CPU tensors of the
DESIGN.md section 8 shapes with a stand-in Triton driver that reports an sm_90 target, and a
Triton cache hook records each specialisation they would compile (argument types, the
divisibility Triton infers from the tensors and integers, the constexprs) instead of
launching it. Each one is then compiled to PTX and a cubin with Triton's own compiler and the
ptxas it ships, and the script records per kernel: registers per thread, spill bytes, shared
memory, and the width in bytes of every global load and store (cp.async copies included),
attributed to the load/store statement they come from through the PTX line info.

Exit status 1 when a kernel spills at a design shape (tests/test_codegen.py runs --quick),
unless --spills-ok: `make test` also compiles with the GPU host's older Triton, where a few
4-byte spills are known (bench/NOTES.md) and only a failure to compile should stop the run.
Triton's own cache (~/.triton/cache) makes a second run fast.
"""
import argparse
import ast
import collections
import datetime
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

# Ahead-of-time compilation needs the real compiler, never the interpreter: decided before
# triton is imported (a parent pytest process may have set it for its own use).
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchutils import EXIT_SHAPES as SECTION_8_SHAPES, STAGE_SHAPES  # noqa: E402

TARGET_CAPABILITY = 90
BATCH = 128
COMPACT_BATCH = 256


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_CAPABILITY, 32)


class _CompileOnlyDriver:
    """Just enough of a Triton driver for the JIT to pick a target and specialise arguments;
    nothing is ever launched (the cache hook below stops every launch before it happens)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return _target()

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclass
class Specialisation:
    kernel: str
    fn: object                      # the JITFunction
    compile_args: dict              # signature, constants, configs, num_warps, num_stages
    cases: List[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.compile_args["specialization_data"]


def capture(cases) -> List[Specialisation]:
    """Run each case's launchers with the compile-only driver; one entry per distinct
    specialisation, with the cases that asked for it."""
    from triton import knobs
    found: Dict[str, Specialisation] = {}
    current = [""]

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        spec = Specialisation(fn.name, fn.jit_function, compile)
        spec = found.setdefault(spec.key, spec)
        if current[0] not in spec.cases:
            spec.cases.append(current[0])
        return True  # "handled": the JIT neither compiles nor launches

    triton.runtime.driver.set_active(_CompileOnlyDriver())
    knobs.runtime.jit_cache_hook = hook
    try:
        for label, run in cases:
            current[0] = label
            run()
    finally:
        knobs.runtime.jit_cache_hook = None
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# The cases: the launchers exactly as the public ops call them


def _exit_head_case(shape, num_classes, dtype, layout):
    from occam_kernels.triton import exit_head as kernels

    def run():
        channels, height, width = shape
        h = torch.rand(BATCH, channels, height, width).to(dtype)
        if layout == "channels_last":
            h = h.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(num_classes, channels).to(dtype)
        bias = torch.zeros(num_classes, dtype=dtype)
        labels = torch.randint(0, num_classes, (BATCH,))
        logits, pooled, _, threshold = kernels.exit_head_forward(h, weight, bias, labels)
        # the one-pass backward (an opt-in candidate) wherever it can run
        for one_pass in (False, True)[:1 + kernels.one_pass_fits(h, num_classes)]:
            kernels.exit_head_backward(h, weight, bias, labels, torch.ones_like(logits),
                                       torch.ones_like(pooled), torch.ones(BATCH, dtype=dtype),
                                       pooled=pooled, threshold=threshold,
                                       one_pass=one_pass)
        kernels.class_activation_maps(h, weight, bias)
    name = str(dtype).split(".")[-1]
    return f"exit_head {'x'.join(map(str, shape))} K={num_classes} {name} {layout}", run


def _compact_case(shape, dtype, layout):
    from occam_kernels.triton.compact import compact

    def run():
        x = torch.zeros(COMPACT_BATCH, *shape, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        keep = torch.arange(COMPACT_BATCH) % 2 == 0
        compact(x, keep, torch.arange(COMPACT_BATCH))
    name = str(dtype).split(".")[-1]
    return f"compact {'x'.join(map(str, shape))} {name} {layout}", run


def design_cases(quick: bool):
    dtypes = [torch.float32, torch.bfloat16] + ([] if quick else [torch.float16])
    cases = []
    for shape in SECTION_8_SHAPES:
        for dtype in dtypes:
            for layout in ("contiguous", "channels_last"):
                cases.append(_exit_head_case(shape, 10, dtype, layout))
    for shape in ([(58, 40, 40), (464, 5, 5)] if quick else SECTION_8_SHAPES):
        cases.append(_exit_head_case(shape, 1000, torch.bfloat16, "contiguous"))
    for shape in STAGE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            cases.append(_compact_case(shape, dtype, "channels_last"))
    return cases


# ---------------------------------------------------------------------------------------------
# Compile and read the machine code


@dataclass
class KernelReport:
    kernel: str
    cases: List[str]
    signature: str
    num_warps: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    # "load h (exit_head.py:109)" -> sorted distinct widths in bytes, and instruction count
    accesses: Dict[str, Tuple[List[int], int]]


def _ptxas_resources(ptx: str) -> Tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v, as Triton invokes it."""
    from triton.backends.nvidia.compiler import get_ptxas
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        out = subprocess.run([get_ptxas(TARGET_CAPABILITY).path, "-lineinfo", "-v",
                              "--regAllocOptLevel=2", f"--gpu-name=sm_{TARGET_CAPABILITY}a",
                              source, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    spill_loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", log))
    return registers, spill_stores, spill_loads


_ACCESS = re.compile(r"\b(ld\.global|st\.global|cp\.async\.\w+\.shared\.global)(\S*)")
_MEMORY_CALL = re.compile(r"tl\.(load|store)\(\s*([A-Za-z_][A-Za-z_0-9]*)")


def _access_width(opcode: str, modifiers: str, line: str) -> int:
    if opcode.startswith("cp.async"):
        return int(re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(,|;)", line).group(1), 0)
    vector = re.search(r"\.v(\d)", modifiers)
    bits = re.search(r"\.[bfsu](\d+)$", modifiers)
    return (int(vector.group(1)) if vector else 1) * int(bits.group(1)) // 8


@dataclass
class _Statement:
    first_line: int
    kind: str       # "load", "store" or "" (not a memory call)
    pointer: str


@functools.lru_cache(maxsize=None)
def _statements(path: str) -> List[_Statement]:
    with open(path) as handle:
        source = handle.read()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt) and not isinstance(
                node, (ast.FunctionDef, ast.For, ast.If, ast.While, ast.With)):
            text = ast.get_source_segment(source, node) or ""
            match = _MEMORY_CALL.search(text)
            out.append(_Statement(node.lineno, match.group(1) if match else "",
                                  match.group(2) if match else ""))
    return sorted(out, key=lambda s: s.first_line)


def _attribute(path: str, line: int, kind: str) -> str:
    """The load/store statement an instruction at `line` comes from: the nearest such
    statement at or above it (software pipelining moves loads under the next statement)."""
    best = None
    for statement in (_statements(path) if os.path.isfile(path) else []):
        if statement.first_line > line:
            break
        if statement.kind == kind:
            best = statement
    if best is None:
        return f"{kind} ? ({os.path.basename(path)}:{line})"
    return f"{kind} {best.pointer} ({os.path.basename(path)}:{best.first_line})"


def global_accesses(ptx: str) -> Dict[str, Tuple[List[int], int]]:
    files = {m.group(1): m.group(2)
             for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    location = ("?", 0)
    widths = collections.defaultdict(list)
    for text in ptx.splitlines():
        loc = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", text)
        if loc:
            location = (files.get(loc.group(1), "?"), int(loc.group(2)))
            continue
        access = _ACCESS.search(text)
        if not access:
            continue
        kind = "store" if access.group(1).startswith("st") else "load"
        name = _attribute(location[0], location[1], kind)
        widths[name].append(_access_width(access.group(1), access.group(2), text))
    return {name: (sorted(set(w)), len(w)) for name, w in sorted(widths.items())}


def compile_and_inspect(spec: Specialisation) -> KernelReport:
    args = spec.compile_args
    source = ASTSource(spec.fn, args["signature"], args["constants"], args["configs"][0])
    compiled = triton.compile(source, target=_target(),
                              options={"num_warps": args["num_warps"],
                                       "num_stages": args["num_stages"]})
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = _ptxas_resources(ptx)
    signature = ", ".join(f"{k}={v}" for k, v in args["signature"].items() if v != "constexpr")
    return KernelReport(spec.kernel, spec.cases, signature, args["num_warps"], registers,
                        spill_stores, spill_loads, compiled.metadata.shared,
                        global_accesses(ptx))


# ---------------------------------------------------------------------------------------------
# Report


def _case_summary(spec_cases: List[str]) -> str:
    return spec_cases[0] + (f" (+{len(spec_cases) - 1} more)" if len(spec_cases) > 1 else "")


# Which pointer names carry the big tensors, for the summary table.
_H_POINTERS = {"sample", "sample_ptr", "x_ptr"}
_OUT_POINTERS = {"grad_h_ptr", "out_ptr", "cam_ptr"}


def _widths(report: KernelReport, kind: str, pointers) -> str:
    found = sorted({w for name, (widths, _) in report.accesses.items()
                    if name.split()[0] == kind and name.split()[1] in pointers for w in widths})
    return "/".join(map(str, found)) or "-"


def _summary(reports: List[KernelReport], cases: List[str]) -> List[str]:
    """Per case: each kernel's h load widths (and dh / CAM / compacted-row store widths)."""
    kernels = ["_pool_kernel", "_supp_kernel", "_grad_h_kernel", "_grad_weight_kernel",
               "_grad_h_and_weight_kernel", "_cam_kernel", "_compact_kernel"]
    lines = ["| case | " + " | ".join(k.strip("_").replace("_kernel", "") for k in kernels)
             + " | max registers | spills |", "|---" * (len(kernels) + 3) + "|"]
    for case in cases:
        cells, registers, spills = [], 0, 0
        for kernel in kernels:
            report = next((r for r in reports if r.kernel == kernel and case in r.cases), None)
            if report is None:
                cells.append("")
                continue
            text = _widths(report, "load", _H_POINTERS)
            stored = _widths(report, "store", _OUT_POINTERS)
            cells.append(text + (f" / st {stored}" if stored != "-" else ""))
            registers = max(registers, report.registers)
            spills += report.spill_store_bytes + report.spill_load_bytes
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {registers} | {spills} |")
    return lines


def render(reports: List[KernelReport], cases: List[str], quick: bool) -> str:
    lines = [
        "# Ahead-of-time codegen of the Triton kernels (sm_90)", "",
        "Generated by `python bench/codegen.py`; do not edit by hand. No GPU was used: the "
        "launchers ran on CPU tensors at the DESIGN.md section 8 shapes (B=128; compaction "
        "B=256) with a compile-only Triton driver, and every specialisation they asked for "
        "was compiled by Triton's compiler and the ptxas it ships. This says what the "
        "hardware will be asked to run (registers, spills, shared memory, access widths); "
        "it says nothing about speed.", "",
        f"triton {triton.__version__}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}{', quick case list' if quick else ''}.", "",
        "Access widths are bytes per instruction per thread (16 = a 128-bit vector; cp.async "
        "copies global memory to shared memory for tl.dot), attributed to the load/store "
        "statement by the PTX line info. `sample`/`sample_ptr` is h, `w_ptr` the CAM "
        "weight, `grad_h_ptr`/`scratch_ptr` dh, `x_ptr`/`out_ptr` the compacted rows.", "",
        "## Summary", "",
        "Per case, the bytes per access of the big tensor each kernel reads (h; the rows "
        "for compaction) and, after `st`, writes (dh, the CAM, the compacted rows). 16 is a "
        "128-bit vector. Narrow accesses remain where a row is not a multiple of 16 bytes "
        "(channels_last with C = 58 or 116, 5x5 and 10x10 maps) or is not known to be one "
        "(Triton specialises integers on divisibility by 16 only).", ""]
    lines += _summary(reports, cases)
    lines += [
        "", "## Every specialisation", "",
        "| kernel | first case (+ others with the same specialisation) | warps | registers "
        "| spills (store/load B) | shared B | global accesses: widths in B (count) |",
        "|---|---|---|---|---|---|---|"]
    for report in reports:
        accesses = "<br>".join(f"{name}: {'/'.join(map(str, widths))} ({count})"
                               for name, (widths, count) in report.accesses.items())
        lines.append(
            f"| {report.kernel} | {_case_summary(report.cases)} | {report.num_warps} | "
            f"{report.registers} | {report.spill_store_bytes}/{report.spill_load_bytes} | "
            f"{report.shared_bytes} | {accesses} |")
    spilling = [r for r in reports if r.spill_store_bytes or r.spill_load_bytes]
    lines += ["", f"{len(reports)} specialisations; "
              f"{len(spilling)} spill" + ("" if len(spilling) == 1 else "s") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown report (e.g. bench/CODEGEN.md)")
    parser.add_argument("--json", help="the same data as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="fp32 and bf16 only, K=1000 at two shapes (the test's list)")
    parser.add_argument("--spills-ok", action="store_true",
                        help="report spills but exit 0 (only a failure to compile fails)")
    args = parser.parse_args(argv)
    cases = design_cases(args.quick)
    specs = capture(cases)
    reports = []
    for number, spec in enumerate(specs, start=1):
        reports.append(compile_and_inspect(spec))
        print(f"[{number}/{len(specs)}] {spec.kernel}: {reports[-1].registers} registers, "
              f"spills {reports[-1].spill_store_bytes}/{reports[-1].spill_load_bytes} B",
              flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(render(reports, [label for label, _ in cases], args.quick))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([report.__dict__ for report in reports], handle, indent=1)
    spilling = [r for r in reports if r.spill_store_bytes or r.spill_load_bytes]
    for report in spilling:
        print(f"SPILL: {report.kernel} at {report.cases[0]}: {report.spill_store_bytes} B "
              f"stored, {report.spill_load_bytes} B loaded", file=sys.stderr)
    print(f"{len(reports)} specialisations compiled for sm_{TARGET_CAPABILITY} with triton "
          f"{triton.__version__}; {len(spilling)} spill", file=sys.stderr)
    return 1 if spilling and not args.spills_ok else 0


if __name__ == "__main__":
    sys.exit(main())
