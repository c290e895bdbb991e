"""Build occam_kernels._C from csrc/.

CUDA extension when torch is a CUDA build and nvcc is found, CPU-only C++ extension otherwise.

Environment switches:
  OCCAM_BUILD_CUDA=0|1   0 skips the CUDA part; 1 forces it and fails clearly without nvcc.
  OCCAM_CUDA_ARCHS       e.g. "8.0;9.0+PTX" (default): sm_80 and sm_90, PTX for the newest.
  MAX_JOBS               parallel compile jobs (torch's ninja builder reads it).
  CUDA_HOME              toolkit root; else /usr/local/cuda; else resolved from `nvcc` on PATH.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _nvcc_in(root):
    return root if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) else None


def find_cuda_home():
    """CUDA_HOME from the environment, else /usr/local/cuda, else the toolkit behind `nvcc`.

    The `nvcc` on PATH may be a wrapper script outside the toolkit, so its location is not
    enough: nvcc's dry run prints the real TOP directory.
    """
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _nvcc_in(root):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if match and _nvcc_in(os.path.realpath(os.path.join(match.group(1).strip(), ".."))):
            return os.path.realpath(os.path.join(match.group(1).strip(), ".."))
    except (OSError, subprocess.SubprocessError):
        pass
    return _nvcc_in(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+), (V[\d.]+)", out)
    return match.group(2) if match else "unknown"


def build_extensions():
    switch = os.environ.get("OCCAM_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        sys.exit(f"OCCAM_BUILD_CUDA must be 0 or 1, got {switch!r}")
    cuda_home = find_cuda_home() if switch != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import: set it first, or torch guesses
        # from the nvcc wrapper and fails to link -lcudart.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    want_cuda = switch == "1" or (switch == "" and torch.version.cuda is not None and cuda_home)
    if switch == "1" and torch.version.cuda is None:
        sys.exit("OCCAM_BUILD_CUDA=1 but this torch is a CPU-only build "
                 f"({torch.__version__}); install a CUDA build of torch first.")
    if switch == "1" and not cuda_home:
        sys.exit("OCCAM_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit "
                 "root (the folder holding bin/nvcc) or put nvcc on PATH.")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    archs = os.environ.get("OCCAM_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    defines = [("OCCAM_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3"]  # torch sets the C++ standard it needs (C++20 for 2.14)
    if want_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        defines += [("WITH_CUDA", None),
                    ("OCCAM_CUDA_ARCHS", f'"{archs}"'),
                    ("OCCAM_NVCC_VERSION", f'"{nvcc_version(cuda_home)}"')]
        print(f"occam_kernels: building CUDA extension with {cuda_home}/bin/nvcc for {archs}",
              flush=True)
        ext = CUDAExtension(
            "occam_kernels._C", sources + cuda_sources, define_macros=defines,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})
    else:
        reason = ("OCCAM_BUILD_CUDA=0" if switch == "0" else
                  "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found")
        print(f"occam_kernels: building the CPU-only extension ({reason})", flush=True)
        ext = CppExtension("occam_kernels._C", sources, define_macros=defines,
                           extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = build_extensions()

setup(
    name="occamnets",
    version="0.1.0",
    description="OccamNets with fused CUDA/Triton exit-head and sample-compaction kernels",
    packages=find_packages(include=["occam_kernels*", "occamnets*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "pillow", "tqdm", "matplotlib", "mlxtend", "h5py"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy"], "triton": ["triton"]},
    entry_points={"console_scripts": ["occamnets=occamnets.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
