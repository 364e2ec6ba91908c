"""`trl_lifealign.allocator`: with freed memory kept for reuse, a large block allocated again costs no page faults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from trl_lifealign.allocator import ENV_SWITCH, reuse_freed_memory

REPEATED_BLOCK = textwrap.dedent("""
    import ctypes, resource
    from trl_lifealign.allocator import reuse_freed_memory

    applied = reuse_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, faults = 64 << 20, []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, faults[-1])
""")


def _faults_of_the_third_block(switch: str) -> tuple[str, int]:
    env = {**os.environ, ENV_SWITCH: switch}
    out = subprocess.run([sys.executable, "-c", REPEATED_BLOCK], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_without_page_faults():
    default_applied, default_faults = _faults_of_the_third_block("default")
    reuse_applied, reuse_faults = _faults_of_the_third_block("reuse")
    assert (default_applied, reuse_applied) == ("False", "True")
    assert default_faults >= 10  # glibc unmapped the block and the kernel mapped it afresh
    assert reuse_faults * 10 <= default_faults, (reuse_faults, default_faults)


def test_the_switch_is_validated(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "default")
    assert reuse_freed_memory() is False
    monkeypatch.setenv(ENV_SWITCH, "jemalloc")
    with pytest.raises(ValueError, match="LIFEALIGN_CPU_MALLOC must be 'reuse' or 'default', got 'jemalloc'"):
        reuse_freed_memory()


def test_on_cpu_the_entry_points_apply_it(monkeypatch):
    import torch

    from trl_lifealign.allocator import reuse_freed_memory_on_cpu

    monkeypatch.setenv(ENV_SWITCH, "default")
    assert reuse_freed_memory_on_cpu() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(ENV_SWITCH, "jemalloc")  # would raise if it were consulted
    assert reuse_freed_memory_on_cpu() is False
