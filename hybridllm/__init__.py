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
from .runner import Runner
from .tokenizer import IncrementalDecoder, Tokenizer

__version__ = "0.1.0"

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
