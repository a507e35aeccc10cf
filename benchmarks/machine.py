"""What machine a benchmark ran on: every results JSON records it (speeds differ between hosts,
and onnxruntime's and numpy's kernels depend on the CPU's SIMD flags)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "fma")


def cpu_facts() -> dict:
    """CPU model and the SIMD flags that decide onnxruntime's and numpy's kernels."""
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "flags": [f for f in SIMD_FLAGS if f in flags]}


def machine_facts() -> dict:
    """cpu_facts plus platform, Python and the load average (the machine may be shared)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {**cpu_facts(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in load]}
