"""One exception family for hybridllm. Every message names the file, argument or value at fault."""


class HybridLLMError(Exception):
    """Base class of every error hybridllm raises on purpose."""


class ModelFormatError(HybridLLMError, ValueError):
    """A model file is not a valid GGUF, is truncated or corrupted, or lacks what we need."""


class UnsupportedTensorTypeError(ModelFormatError, NotImplementedError):
    """A tensor uses a GGML type that hybridllm has no kernel for (IQ*, TQ*, MXFP4, ...)."""


class ModelNotFoundError(HybridLLMError, FileNotFoundError):
    """A model argument is neither an existing file nor a name in the catalog."""


class DownloadError(HybridLLMError, RuntimeError):
    """Fetching a catalog model failed (network, pip, checksum)."""


class ContextFullError(HybridLLMError, RuntimeError):
    """The prompt plus generated tokens no longer fit in n_ctx."""


class DeviceError(HybridLLMError, RuntimeError):
    """A GPU was asked for but CuPy or a CUDA device is missing, or it ran out of memory."""


class ConfigError(HybridLLMError, ValueError):
    """An argument, option or environment value that cannot be used; the message names it."""


class GrammarError(ConfigError):
    """A structured-output constraint (JSON Schema, regex, grammar, choices, response_format) that
    cannot be used: invalid, unsupported by llguidance, or matching nothing; the message quotes
    llguidance's own words and names the argument."""

    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"{option}: {detail}")
        self.option = option  # the argument at fault: "json_schema", "regex", "grammar", ...
        self.detail = detail  # what is wrong, without the argument's name


class ContextLengthWarning(UserWarning):
    """n_ctx goes beyond the context the model was trained on: answers there may degrade."""


def context_length_note(n_ctx: int, trained: int) -> str:
    """Why a context beyond the trained length is allowed but warned about (as llama.cpp does)."""
    return (
        f"n_ctx={n_ctx} is beyond the {trained} tokens the model was trained on; "
        "text past that point may degrade"
    )
