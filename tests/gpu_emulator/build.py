"""Build `cuda_kernels.cu` with g++ against the SIMT emulator (cuda_emu.h) and launch its kernels.

The kernel file is compiled as it is, with two mechanical front-end steps done here:
- every inline PTX statement (`asm("op %0, %1, ...;" : "=c"(out) : "c"(in), ...)`) is lowered
  to a call of the emulator's exact version of that instruction (`emu::ptx::op`); an opcode or
  operand constraint this table does not know is a build error, never a silent skip;
- a launcher `emu_launch_<kernel>(cfg, args)` is generated from each `extern "C" __global__`
  kernel's C++ signature (after the preprocessor expanded the kernel-defining macros), so the
  Python side knows every parameter's type and rejects a wrong scalar type (an int32 for an
  int64 is garbage on a real GPU and CuPy does not say so).

The shared object is cached under ~/.cache/hybridllm-gpu-emulator keyed by the hash of the
kernel source, the emulator header and this file, so a test session compiles it once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu.h"
KERNEL_SOURCE = HERE.parents[1] / "hybridllm" / "backends" / "cuda_kernels.cu"
MAX_DYN_SHARED = 48 * 1024
#: Extra g++ flags, e.g. "-fsanitize=undefined -fno-sanitize-recover=all" (misaligned vector
#: loads, shifts past the width, signed overflow in the kernels); part of the cache key.
#: AddressSanitizer does not follow the emulator's own stack switches, so it is not offered.
EXTRA_FLAGS_ENV = "HYBRIDLLM_EMU_CFLAGS"
ORDER_ENV = "HYBRIDLLM_EMU_ORDER"  # bytes; CuPy asks for no more unless a kernel attribute is set

#: PTX opcode -> (emulator function, output constraint, input constraints)
PTX_OPS: dict[str, tuple[str, str, str]] = {
    "cvt.f32.f16": ("emu::ptx::cvt_f32_f16", "f", "h"),
    "cvt.rn.f16.f32": ("emu::ptx::cvt_rn_f16_f32", "h", "f"),
    "dp4a.s32.s32": ("emu::ptx::dp4a_s32_s32", "r", "rrr"),
}
#: C scalar types of kernel parameters -> the numpy scalar type a launch must pass.
SCALARS: dict[str, type[np.generic]] = {
    "int": np.int32, "unsigned": np.uint32, "unsigned int": np.uint32, "u32": np.uint32,
    "i64": np.int64, "long long": np.int64, "float": np.float32, "double": np.float64,
}  # fmt: skip

_ASM = re.compile(
    r'\basm\s*(?:volatile\s*)?\(\s*"([^"]*)"\s*:\s*"=([a-z])"\s*\(\s*(\w+)\s*\)\s*:\s*(.*?)\)\s*;',
    re.S,
)
_ASM_INPUT = re.compile(r'"([a-z])"\s*\(\s*([^()]*?)\s*\)')
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\(\s*(\d+)\s*\)\s*)?(\w+)\s*\(([^)]*)\)'
)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([\w ]+?)\s+(\w+)\s*\[\s*\]")


class EmulatorError(RuntimeError):
    """A launch the emulator refused or a kernel fault it caught (barrier, shuffle, bounds)."""


@dataclass(frozen=True)
class Param:
    ctype: str  # e.g. "const u8*", "i64"
    name: str

    @property
    def is_pointer(self) -> bool:
        return "*" in self.ctype

    @property
    def scalar(self) -> type[np.generic]:
        base = self.ctype.replace("const", "").strip()
        if base not in SCALARS:
            raise EmulatorError(
                f"kernel parameter {self.name}: no numpy type for C type {self.ctype!r}"
            )
        return SCALARS[base]


@dataclass(frozen=True)
class KernelSig:
    name: str
    bound: int  # __launch_bounds__ (0: none)
    params: tuple[Param, ...]


def lower_ptx(source: str) -> str:
    """Replace each inline PTX statement by the emulator's function; same line count."""
    n_asm = len(re.findall(r"\basm\s*(?:volatile\s*)?\(", source))

    def one(m: re.Match[str]) -> str:
        text, out_c, out_var, inputs = m.group(1), m.group(2), m.group(3), m.group(4)
        opcode, _, operands = text.strip().rstrip(";").partition(" ")
        if opcode not in PTX_OPS:
            raise EmulatorError(f"inline PTX {text!r}: the emulator has no {opcode}")
        fn, want_out, want_in = PTX_OPS[opcode]
        ins = _ASM_INPUT.findall(inputs)
        got_in = "".join(c for c, _ in ins)
        if out_c != want_out or got_in != want_in:
            raise EmulatorError(
                f"inline PTX {text!r}: constraints ={out_c} {got_in}, expected ={want_out} {want_in}"
            )
        refs = [r.strip() for r in operands.split(",")]
        if refs != [f"%{i}" for i in range(1 + len(ins))]:
            raise EmulatorError(
                f"inline PTX {text!r}: operands must be %0 (output), %1.. (inputs) in order"
            )
        call = f"{out_var} = {fn}({', '.join(v for _, v in ins)});"
        return call + "\n" * m.group(0).count("\n")

    lowered, count = _ASM.subn(one, source)
    if count != n_asm:
        raise EmulatorError(f"{n_asm} asm statements in the kernel source, {count} understood")
    return lowered


def kernel_signatures(source_path: Path) -> list[KernelSig]:
    """The extern "C" kernels after preprocessing (the kernel-defining macros expanded)."""
    pre = subprocess.run(
        ["g++", "-E", "-P", "-x", "c++", "-std=c++17", "-D__CUDA_ARCH__=900", str(source_path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    sigs = []
    for bound, name, params in _KERNEL.findall(pre):
        plist = []
        for p in params.split(","):
            words = p.replace("__restrict__", "").split()
            ctype, pname = " ".join(words[:-1]), words[-1]
            while pname.startswith("*"):
                ctype, pname = ctype + "*", pname[1:]
            plist.append(Param(ctype.replace(" *", "*"), pname))
        sigs.append(KernelSig(name, int(bound or 0), tuple(plist)))
    return sigs


def _launcher(sigs: list[KernelSig], lowered_path: Path, source: str) -> str:
    lines = [f'#include "{HEADER}"', f'#include "{lowered_path}"', ""]
    for ctype, name in sorted(set(_EXTERN_SHARED.findall(source))):
        lines.append(
            f"alignas(16) thread_local {ctype} {name}[{MAX_DYN_SHARED} / sizeof({ctype})];"
        )
        lines.append(f'extern "C" void* emu_dyn_shared_{name}() {{ return (void*){name}; }}')
    lines.append('extern "C" const char* emu_error() { return emu::st().message.c_str(); }')
    lines.append('extern "C" void emu_set_order(int order, unsigned seed) {')
    lines.append("    emu::st().order = (emu::Order)order; emu::st().rng.seed(seed); }")
    for k in sigs:
        lines.append(f'extern "C" int emu_launch_{k.name}(const unsigned* cfg, void** args) {{')
        names = []
        for i, p in enumerate(k.params):
            lines.append(f"    {p.ctype} a{i} = *reinterpret_cast<{p.ctype}*>(args[{i}]);")
            names.append(f"a{i}")
        lines.append(
            f"    const std::function<void()> body = [&] {{ {k.name}({', '.join(names)}); }};"
        )
        lines.append(
            "    dim3 g, b; g.x = cfg[0]; g.y = cfg[1]; g.z = cfg[2]; b.x = cfg[3]; b.y = cfg[4]; b.z = cfg[5];"
        )
        lines.append(f"    return emu::launch(g, b, {k.bound}, body);")
        lines.append("}")
    return "\n".join(lines) + "\n"


def cache_dir() -> Path:
    root = os.environ.get("HYBRIDLLM_EMU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybridllm-gpu-emulator"
    )
    return Path(root)


def build(source_path: Path = KERNEL_SOURCE) -> tuple[Path, list[KernelSig], list[str]]:
    """Compile (or reuse) the emulated kernels; -> (.so path, kernel signatures, extern shared names)."""
    source = source_path.read_text()
    extra = os.environ.get(EXTRA_FLAGS_ENV, "").split()
    key_text = source + HEADER.read_text() + Path(__file__).read_text() + " ".join(extra)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    out_dir = cache_dir() / key
    so = out_dir / "kernels.so"
    sigs = kernel_signatures(source_path)
    shared = sorted(name for _, name in _EXTERN_SHARED.findall(source))
    if so.exists():
        return so, sigs, shared
    out_dir.mkdir(parents=True, exist_ok=True)
    lowered = out_dir / "kernels_lowered.cu"
    lowered.write_text(f'#line 1 "{source_path}"\n' + lower_ptx(source))
    launcher = out_dir / "launcher.cpp"
    launcher.write_text(_launcher(sigs, lowered, source))
    # -ffp-contract=off: a * b + c stays two roundings, as the kernels' explicit __fmaf_rn /
    # __fmul_rn calls expect; the CPU kernels they are compared with are built the same way.
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
        cmd = [
            "g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing",
            "-fno-omit-frame-pointer", "-Wno-unknown-pragmas", *extra, "-o", tmp.name, str(launcher),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            os.unlink(tmp.name)
            raise EmulatorError(f"g++ failed on the emulated kernels:\n{result.stderr[-6000:]}")
        os.replace(tmp.name, so)  # atomic: a concurrent build sees the old or the new file
    return so, sigs, shared


class Emulator:
    """The loaded kernels: launch(name, grid, block, args, shared_mem) with checked arguments."""

    def __init__(self, source_path: Path = KERNEL_SOURCE) -> None:
        so, sigs, shared = build(source_path)
        self.lib = ctypes.CDLL(str(so))
        self.kernels = {k.name: k for k in sigs}
        self.lib.emu_error.restype = ctypes.c_char_p
        self._dyn = {}
        for name in shared:
            fn = getattr(self.lib, f"emu_dyn_shared_{name}")
            fn.restype = ctypes.c_void_p
            self._dyn[name] = fn()
        self.launches = 0
        # HYBRIDLLM_EMU_ORDER=reverse|random[:seed] runs a whole test session in that fiber order
        order, _, seed = os.environ.get(ORDER_ENV, "forward").partition(":")
        self.set_order(order, int(seed or 0))

    def set_order(self, order: str, seed: int = 0) -> None:
        """Order in which a block's runnable fibers are resumed: forward, reverse or random."""
        self.lib.emu_set_order(
            ctypes.c_int(("forward", "reverse", "random").index(order)), ctypes.c_uint(seed)
        )

    def launch(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple,
        pointers: list[int],
        shared_mem: int = 0,
    ) -> None:
        """Run kernel `name`; `pointers` holds the device address of each pointer parameter in order."""
        self.prepare(name, grid, block, args, pointers, shared_mem)()

    def prepare(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple,
        pointers: list[int],
        shared_mem: int = 0,
    ) -> Callable[[], None]:
        """Check a launch and pack its arguments now (as cuLaunchKernel does, also while a stream
        captures); -> the launch itself, which may run later and more than once (a graph)."""
        sig = self.kernels.get(name)
        if sig is None:
            raise EmulatorError(f"no kernel {name!r} in {KERNEL_SOURCE.name}")
        if len(args) != len(sig.params):
            raise EmulatorError(f"{name}: {len(args)} arguments for {len(sig.params)} parameters")
        if shared_mem > MAX_DYN_SHARED:
            raise EmulatorError(
                f"{name}: {shared_mem} bytes of dynamic shared memory, the limit is {MAX_DYN_SHARED}"
            )
        storage: list[ctypes._SimpleCData] = []
        ptrs = iter(pointers)
        for p, a in zip(sig.params, args, strict=True):
            if p.is_pointer:
                storage.append(ctypes.c_void_p(next(ptrs)))
                continue
            want = p.scalar
            if type(a) is not want:
                raise EmulatorError(
                    f"{name}: parameter {p.name} is {p.ctype}, got {type(a).__name__} {a!r} "
                    f"(pass {want.__name__}: anything else is garbage on a GPU)"
                )
            storage.append(_c_scalar(a))
        argv = (ctypes.c_void_p * max(1, len(storage)))(*[ctypes.addressof(s) for s in storage])
        cfg = (ctypes.c_uint * 6)(*_dim(grid), *_dim(block))
        entry = getattr(self.lib, f"emu_launch_{name}")
        packed = (cfg, argv, storage)  # argv points into storage: both live as long as the launch

        def run() -> None:
            poisoned = self._poison(shared_mem)
            rc = entry(packed[0], packed[1])
            self.launches += 1
            if rc:
                raise EmulatorError(f"{name}: {self.lib.emu_error().decode()}")
            self._check_poison(name, shared_mem, poisoned)

        return run

    def _poison(self, shared_mem: int) -> list[tuple[int, int]]:
        """Fill the dynamic shared memory past what the launch asked for with a pattern."""
        spans = [(addr + shared_mem, MAX_DYN_SHARED - shared_mem) for addr in self._dyn.values()]
        for addr, size in spans:
            ctypes.memset(addr, 0xA5, size)
        return spans

    def _check_poison(self, name: str, shared_mem: int, spans: list[tuple[int, int]]) -> None:
        for addr, size in spans:
            if ctypes.string_at(addr, size).count(b"\xa5") != size:
                raise EmulatorError(
                    f"{name}: wrote dynamic shared memory past the {shared_mem} bytes the launch asked for"
                )


def _c_scalar(a: np.generic) -> ctypes._SimpleCData:
    return {
        np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
        np.float32: ctypes.c_float, np.float64: ctypes.c_double,
    }[type(a)](a.item())  # fmt: skip


def _dim(d: tuple[int, ...] | int) -> tuple[int, int, int]:
    t = (d,) if isinstance(d, int) else tuple(int(v) for v in d)
    if not 1 <= len(t) <= 3:
        raise EmulatorError(f"a launch dimension has 1 to 3 entries, got {d!r}")
    return (*t, *(1,) * (3 - len(t)))  # type: ignore[return-value]


_EMULATOR: Emulator | None = None


def emulator() -> Emulator:
    """The process-wide emulator (built on first use)."""
    global _EMULATOR
    if _EMULATOR is None:
        _EMULATOR = Emulator()
    return _EMULATOR
