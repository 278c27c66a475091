"""Model FLOPs per token, the device's peak FLOP/s, and MFU.

FLOPs per trained token are the model's (``lowrank_pt.model.llama.flops_per_token``, the PaLM /
torchtitan convention), as the stage's method declares them (``Method.flops_per_token``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import time

import torch

from lowrank_pt.model.llama import flops_per_token  # noqa: F401 - the tracker's count, named here too

# Dense (no structured sparsity) peak TFLOP/s from the vendors' datasheets, by dtype.
# "fp32" is the non-tensor-core rate, what a float32 matmul gets with TF32 off (PyTorch's
# default); "tf32" is used when torch.backends.cuda.matmul.allow_tf32 is on.
# Patterns are tried longest first, so "A100" is never read as "A10".
GPU_PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    r"H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    r"H100.*PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    r"H100.*NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    r"H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    r"A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    r"L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    r"L40\b": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    r"\bL4\b": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    r"A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    r"\bA10\b": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    r"RTX A6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    r"V100": {"fp16": 125.0, "fp32": 15.7},  # no bf16 support
    r"RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    r"RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
}

PEAK_ENV = "LOWRANK_PT_PEAK_TFLOPS"
"""Set to a number (TFLOP/s per device) to override the table or the CPU measurement."""

CPU_PEAK_FILE = "device_peak.json"


def gpu_peak_flops(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` for ``dtype`` (bf16, fp16, fp32), or None."""
    for pattern in sorted(GPU_PEAKS_TFLOPS, key=len, reverse=True):
        if re.search(pattern, name):
            table = GPU_PEAKS_TFLOPS[pattern]
            key = dtype
            if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32 and "tf32" in table:
                key = "tf32"
            value = table.get(key)
            return None if value is None else value * 1e12
    return None


def _cpu_key(dtype: str) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{socket.gethostname()}|{model}|threads={torch.get_num_threads()}|{dtype}"


def measure_matmul_flops(dtype: str, seconds: float = 1.0, size: int = 1024) -> float:
    """Best FLOP/s of repeated ``size``×``size`` matmuls on the CPU over about ``seconds``."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)  # the global RNG stays untouched: resumes are bit-exact
    a = torch.randn(size, size, generator=gen).to(torch_dtype)
    b = torch.randn(size, size, generator=gen).to(torch_dtype)
    a @ b  # warm-up: thread pool, packing buffers
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def cpu_peak_flops(dtype: str, cache_dir: str, seconds: float = 1.0) -> float:
    """The CPU's matmul peak for ``dtype``, measured once per (host, CPU model, threads, dtype)
    and cached in ``cache_dir/device_peak.json``."""
    path = os.path.join(cache_dir, CPU_PEAK_FILE)
    key = _cpu_key(dtype)
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    value = measure_matmul_flops(dtype, seconds)
    cache[key] = value
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return value


def device_peak(dtype: str, cache_dir: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from) for training in ``dtype`` on this machine."""
    override = os.environ.get(PEAK_ENV)
    if override:
        return float(override) * 1e12, f"{PEAK_ENV}={override}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name, dtype)
        return peak, (f"datasheet ({name})" if peak else f"unknown GPU {name!r}: set {PEAK_ENV}")
    peak = cpu_peak_flops(dtype, cache_dir)
    return peak, f"measured CPU matmul ({_cpu_key(dtype)})"


def mfu(tokens_per_s: float, flops_per_tok: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all ``devices``."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_tok / (peak_per_device * devices)
