"""The machine a run happens on: the device to train on, what the summaries record about it, and the allocator
setting that makes CPU timings and steps steady. Imports nothing else of regrow but its errors."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA kernels run asynchronously: a timing taken without this times
    their launch, not their work); nothing to wait for on the CPU."""
    if not isinstance(device, torch.device):  # timing loops pass a torch.device: no conversion inside the clock
        device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is usable, else the CPU; ``cuda`` (or ``cuda:N``) without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; known: {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda is not None}); use --device cpu or auto")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    env = {"regrow": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "processor": cpu_name(), "threads": torch.get_num_threads(),
           "device": device.type, "steady_allocator": steady_allocator() if device.type == "cpu" else None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_steady = None


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): no page faults per forward. True when in effect.

    Process-wide and permanent (it only keeps up to the peak memory mapped). A no-op returning False where the C
    library is not glibc or ``REGROW_STEADY_ALLOCATOR=0``; the device key records which way a table was measured.
    """
    global _steady
    if _steady is None:
        _steady = False
        if sys.platform.startswith("linux") and os.environ.get("REGROW_STEADY_ALLOCATOR", "1") != "0":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _steady = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and \
                    bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                _steady = False
    return _steady
