"""Faster CPU training: let glibc's allocator keep large freed blocks for reuse.

By default glibc serves every allocation above 128 KiB-32 MiB with a fresh ``mmap`` and unmaps it on free. A training
step on CPU allocates and frees hundreds of megabytes of activations and logits, so every step the kernel maps and
zero-fills them again (system time rivals user time). With every allocation served from the heap and the heap never
trimmed, the next step reuses the same pages. The process then keeps its peak heap until it exits.

Our command-line entry points (``lifealign train``, ``lifealign demo``, the benchmark) call
:func:`reuse_freed_memory_on_cpu`, which applies it when no GPU is present; ``LIFEALIGN_CPU_MALLOC=default`` turns
that off. A Python user may call it once at the start of a CPU training process. Standard library only at import.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["ENV_SWITCH", "reuse_freed_memory", "reuse_freed_memory_on_cpu"]

ENV_SWITCH = "LIFEALIGN_CPU_MALLOC"

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 << 20  # grow the heap in 64 MiB steps: fewer brk calls while a step's tensors pile up


def reuse_freed_memory() -> bool:
    """Serve all allocations from the heap (no ``mmap``) and never give the heap back, for this process.

    Returns True if applied; False where it does not apply (not glibc, or ``LIFEALIGN_CPU_MALLOC=default``).
    Raises ``ValueError`` for another value of ``LIFEALIGN_CPU_MALLOC`` and ``RuntimeError`` if glibc refuses a
    setting.
    """
    switch = os.environ.get(ENV_SWITCH, "reuse").strip().lower()
    if switch not in ("reuse", "default"):
        raise ValueError(f"{ENV_SWITCH} must be 'reuse' or 'default', got {os.environ[ENV_SWITCH]!r}")
    if switch == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # M_TRIM_THRESHOLD -1: never trim (mallopt(3)).
    settings = {"M_MMAP_MAX": (_M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, -1),
                "M_TOP_PAD": (_M_TOP_PAD, _TOP_PAD_BYTES)}
    for name, (parameter, value) in settings.items():
        if mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc mallopt refused {name}={value}")
    return True


def reuse_freed_memory_on_cpu() -> bool:
    """:func:`reuse_freed_memory` when this process sees no CUDA device (GPU training gains nothing from it)."""
    import torch

    return not torch.cuda.is_available() and reuse_freed_memory()
