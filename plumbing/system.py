"""The machine a run is on: which device to use, which low precisions the CPU computes natively,
how much RAM is free, and the one helper that says a warning once per process."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

WARNED: set[str] = set()  # the warnings said in this process, each once


def warn_once(message: str) -> None:
    """'WARNING: message' on stderr, the first time this process says it."""
    if message not in WARNED:
        WARNED.add(message)
        print(f"WARNING: {message}", file=sys.stderr)


# PATCHCORE_BASELINE_CPU=1 hides these from the code, so that a CPU with them runs as one without would. Torch's and
# oneDNN's own kernels choose by the CPU as well: `make test` sets ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2
# beside it for its second pass (docs/architecture.md, "Any CPU").
HIDDEN_BY_BASELINE = ("avx512", "avx_vnni", "amx", "avx_ne_convert", "avx_ifma", "avx_vnni_int8")
BASELINE_ENV = "PATCHCORE_BASELINE_CPU"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo cannot be read), less AVX-512,
    VNNI, BF16 and AMX under PATCHCORE_BASELINE_CPU=1."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()
    if os.environ.get(BASELINE_ENV, "0") not in ("", "0"):
        flags = frozenset(f for f in flags if not f.startswith(HIDDEN_BY_BASELINE))
    return flags


def cpu_supports(precision: str) -> bool:
    """Whether this CPU computes in `precision` natively: bf16 (AVX-512-BF16 or AMX-BF16) or fp16 (AVX-512-FP16
    or AMX-FP16). Emulated low precision is slower than fp32, so it does not count."""
    needs = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}
    return bool(needs[precision] & cpu_flags())


def cpu_kind() -> str:
    """The CPU's model name and the flags that decide its kernels, for the outputs beside speed figures."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    shown = [f for f in wanted if f in cpu_flags()]
    hidden = " (AVX-512, VNNI, BF16 and AMX hidden by PATCHCORE_BASELINE_CPU)" if os.environ.get(BASELINE_ENV, "0") not in ("", "0") else ""
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/vnni/bf16/amx'}{hidden}"


def _visible_nvidia_gpu() -> str | None:
    """The first GPU nvidia-smi lists ('name, driver version'), or None when it is absent or lists none."""
    smi = shutil.which("nvidia-smi") or ("/usr/lib/wsl/lib/nvidia-smi" if Path("/usr/lib/wsl/lib/nvidia-smi").is_file() else None)
    if smi is None:
        return None
    try:
        listed = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = listed.stdout.strip().splitlines()
    return lines[0].strip() if listed.returncode == 0 and lines else None


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when torch can use a GPU, else cpu (saying why, when an NVIDIA GPU is there
    but torch cannot use it); 'cuda' without CUDA is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        gpu = _visible_nvidia_gpu()
        if gpu:
            cuda = torch.version.cuda
            why = (
                f"this torch {torch.__version__} is built for CUDA {cuda}, which needs a newer NVIDIA driver (CUDA 13 needs 580 or newer, "
                f"CUDA 12 needs 525 or newer): update the driver, or install a torch build for your driver's CUDA "
                f"(e.g. pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126)"
                if cuda
                else f"this torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
            )
            warn_once(f"an NVIDIA GPU is visible ({gpu}) but torch cannot use it; running on the CPU. {why}")
        return torch.device("cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device '{device}': use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """'cpu', or the GPU's name, for the run facts (train.json, metrics.json)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def set_cuda_fp32_precision(tf32: bool) -> str:
    """cuDNN convolutions and CUDA matrix products on fp32 tensors: exact fp32 ('ieee', the default here),
    or TF32 (10-bit mantissa, faster on Ampere and newer; about 1e-3 relative error in the features).
    torch's own default runs convolutions in TF32. Process-wide; returns the mode set. Set through the
    allow_tf32 flags: torch.export (the ONNX export) reads those, and refuses a state the newer
    fp32_precision settings leave them in."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    return "tf32" if tf32 else "ieee"


def available_memory_bytes() -> int | None:
    """RAM the system can give without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_feature_memory_gb() -> float:
    """fit()'s default budget for holding all full patch features: half the available RAM."""
    available = available_memory_bytes()
    if available is None:
        warn_once("could not read the available memory; fit keeps full features up to 8 GB (set --feature_memory_gb)")
        return 8.0
    return round(available / 2**30 / 2, 1)
