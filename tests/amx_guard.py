"""Keep llama.cpp off Intel AMX in the test process, where the oracle's AMX path crashes.

On a CPU with AMX (Xeon Sapphire Rapids and later), llama-cpp-python built for the machine
(GGML_NATIVE) puts quantized weights in ggml's AMX buffer type, and llama.cpp 0.3.36's
`ggml_backend_amx_mul_mat` then segfaults on the first evaluation (seen on an AMX Xeon with
SmolLM2 and the tiny test models; upstream ggml-org/llama.cpp#20824, closed without a fix).
ggml enables AMX only if the kernel grants the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
refused, it uses the AVX-512 code of the same build, which is the oracle the exactness tests
need: llama.cpp built for this machine, as it runs on a kernel without AMX support.

`refuse_amx()` installs a seccomp filter that answers that one request with EPERM, for this
process and the ones it starts. Nothing else is filtered; on other machines it does nothing.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 0x1023, 18
SYS_ARCH_PRCTL = 158  # x86_64
AUDIT_ARCH_X86_64 = 0xC000003E
EPERM = 1
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
# struct seccomp_data: nr (u32) at 0, arch (u32) at 4, instruction pointer at 8, args[6] from 16
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0 = 0, 4, 16


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def has_amx() -> bool:
    """Whether this is a Linux x86_64 machine whose CPU reports AMX tiles."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _program() -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k): EPERM for arch_prctl(ARCH_REQ_XCOMP_PERM, ...), every other call allowed."""
    return [
        (BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        (BPF_JEQ_K, 0, 5, AUDIT_ARCH_X86_64),  # another ABI: allow
        (BPF_LD_W_ABS, 0, 0, OFFSET_NR),
        (BPF_JEQ_K, 0, 3, SYS_ARCH_PRCTL),
        (BPF_LD_W_ABS, 0, 0, OFFSET_ARG0),
        (BPF_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def refuse_amx() -> bool:
    """On an AMX machine, refuse the AMX tile permission to this process and its children
    (before llama.cpp first asks for it) -> True if the filter is installed."""
    if not has_amx():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    code = _program()
    filters = (SockFilter * len(code))(*[SockFilter(*c) for c in code])
    prog = SockFprog(len(code), ctypes.cast(filters, ctypes.POINTER(SockFilter)))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True


def amx_refused() -> bool:
    """Whether a request for the AMX tile state is refused now with the filter's EPERM (a CPU
    without AMX answers EOPNOTSUPP: nothing to refuse there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        return False
    return ctypes.get_errno() == EPERM
