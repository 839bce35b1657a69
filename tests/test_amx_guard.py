"""The AMX guard of conftest (tests/amx_guard.py): on an AMX machine the test process may not
enable AMX tiles, so the llama.cpp oracle runs its AVX-512 code instead of the AMX path that
crashes; elsewhere it installs nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from amx_guard import _program, amx_refused, has_amx

TESTS = Path(__file__).resolve().parent


def test_oracle_process_cannot_enable_amx() -> None:
    # conftest's pytest_configure ran refuse_amx() in this process
    assert amx_refused() == has_amx()


def test_filter_passes_into_child_processes() -> None:
    code = "import sys; sys.path.insert(0, sys.argv[1]); from amx_guard import amx_refused; print(amx_refused())"
    out = subprocess.run(
        [sys.executable, "-c", code, str(TESTS)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(has_amx())


def test_program_refuses_only_the_tile_permission_request() -> None:
    """Walk the BPF program as the kernel does for a few calls: only arch_prctl(0x1023) -> EPERM."""

    def verdict(arch: int, nr: int, arg0: int) -> int:
        data = {0: nr, 4: arch, 16: arg0}
        acc, pc, prog = 0, 0, _program()
        while True:
            code, jt, jf, k = prog[pc]
            if code == 0x20:
                acc, pc = data[k], pc + 1
            elif code == 0x15:
                pc += 1 + (jt if acc == k else jf)
            else:
                return k

    x86_64, arch_prctl, other = 0xC000003E, 158, 39  # 39: getpid
    assert verdict(x86_64, arch_prctl, 0x1023) == 0x00050001  # SECCOMP_RET_ERRNO | EPERM
    for call in (
        (x86_64, arch_prctl, 0x1022),
        (x86_64, other, 0x1023),
        (0x40000003, arch_prctl, 0x1023),
    ):
        assert verdict(*call) == 0x7FFF0000  # SECCOMP_RET_ALLOW
