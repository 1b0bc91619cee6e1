"""Where and with what a benchmark ran: the machine (CPU, memory, GPU) and the versions of the stack."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "monai", "dynamic-network-architectures"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 ** 2:.0f} GB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    return f"{os.cpu_count()} CPU cores ({cpu}){mem}; {gpu}"
