"""Build hybridllm, with its C++ core `hybridllm._core` when a compiler is at hand.

The extension is optional: if the compiler is missing or the build fails, the package still
installs and runs its kernels on the Numba fallback (it says so once, at import).
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed C++ build into one plain message instead of a failed install."""

    said = False

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "no extension"
            self._say(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._say(exc)

    @classmethod
    def _say(cls, exc: Exception) -> None:
        """Once, on stderr (pip shows it with -v) and on the terminal (pip hides a successful
        build's output otherwise)."""
        if cls.said:
            return
        cls.said = True
        message = (
            f"\nhybridllm: the C++ core (hybridllm._core) was NOT built: {_short_reason(exc)}.\n"
            "hybridllm still installs and works, on the slower Numba kernels. For the C++ kernels,\n"
            "install a C++17 compiler with OpenMP (e.g. g++) and reinstall hybridllm.\n\n"
        )
        print(message, file=sys.stderr, flush=True)
        try:
            with open("/dev/tty", "w") as tty:
                tty.write(message)
        except OSError:  # no terminal (CI, a pipe): stderr above is all there is
            pass


def _short_reason(exc: Exception) -> str:
    """A failed compiler call as `the compiler /bin/false failed on cpp/x.cpp (exit status 1)`,
    not its whole command line; other errors as they are."""
    for error in (exc, exc.__cause__, exc.__context__):
        cmd = getattr(error, "cmd", None)
        if isinstance(cmd, list | tuple) and cmd:
            sources = [a for a in cmd if str(a).endswith(".cpp")]
            where = f" on {sources[0]}" if sources else ""
            return f"the compiler {cmd[0]} failed{where} (exit status {getattr(error, 'returncode', '?')})"
    return str(exc).rstrip(".") or type(exc).__name__


def core_extension():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        return []
    # -march=native: the wheel is built on the machine that runs it (pip install from source),
    # so the AVX2/FMA paths are chosen at build time for the build machine.
    march = os.environ.get("HYBRIDLLM_MARCH", "native")
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if march:
        flags.append(f"-march={march}")
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "cpp").glob("*.cpp"))
    if not sources:
        return []
    return [
        Pybind11Extension(
            "hybridllm._core",
            sources,
            include_dirs=["cpp"],
            cxx_std=17,
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="hybridllm",
    version="0.1.0",
    description="CPU/GPU hybrid runtime for quantized GGUF language models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["hybridllm", "hybridllm.kernels", "hybridllm.backends", "hybridllm.models",
              "hybridllm.tokenizer", "hybridllm.server"],
    # The catalog's data lives in the top-level models/ folder and installs as hybridllm.models.
    package_dir={"hybridllm.models": "models"},
    package_data={"hybridllm.models": ["*.json"]},
    install_requires=[
        "numpy>=1.26",
        "numba>=0.59",
        "gguf>=0.17",
        "jinja2>=3.1",
        "rich>=13",
        "prompt_toolkit>=3.0",
        "llguidance>=1.9.1,<2",  # structured output (constrain.py); tested with 1.9.1
        "starlette>=0.37",  # hybridllm serve (server/)
        "uvicorn>=0.30",
        "pydantic>=2.5",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "test": ["pytest>=8", "ruff>=0.5", "pexpect>=4.8", "llama-cpp-python==0.3.36",
                 "jsonschema>=4.20", "openai==3.57.0", "httpx>=0.27"],
    },
    entry_points={"console_scripts": ["hybridllm=hybridllm.cli:main"]},
    ext_modules=core_extension(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
