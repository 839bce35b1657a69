"""hybridllm: a CPU/GPU hybrid runtime for quantized GGUF language models."""

from . import (
    _native,  # noqa: F401  (loads the C++ core first, honouring HYBRIDLLM_CORE)
    _user_cache,  # noqa: F401  (Numba's cache out of the install folder, before numba loads)
)
from .errors import (
    ConfigError,
    ContextFullError,
    ContextLengthWarning,
    DeviceError,
    DownloadError,
    HybridLLMError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedTensorTypeError,
)

__version__ = "0.1.0"

#: Public names loaded on first use (PEP 562): `hybridllm.cli` starts without numba, so a
#: mistake on the command line is answered at once; `from hybridllm import Runner` is unchanged.
_LAZY = {"Runner": "runner", "Tokenizer": "tokenizer", "IncrementalDecoder": "tokenizer"}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'hybridllm' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "ConfigError",
    "ContextFullError",
    "ContextLengthWarning",
    "DeviceError",
    "DownloadError",
    "HybridLLMError",
    "IncrementalDecoder",
    "ModelFormatError",
    "ModelNotFoundError",
    "Runner",
    "Tokenizer",
    "UnsupportedTensorTypeError",
    "__version__",
]
