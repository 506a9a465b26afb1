"""alpaca2's exceptions.  Each also subclasses the built-in a user would reach for first."""


class Alpaca2Error(Exception):
    """Base class of every error alpaca2 raises on purpose."""


class ModelLoadError(Alpaca2Error, OSError):
    """A model file could not be loaded: missing, not GGUF, truncated, corrupt or unsupported."""


class ContextFullError(Alpaca2Error, RuntimeError):
    """The tokens do not fit into the context's KV cache (n_ctx)."""


class DecodeError(Alpaca2Error, RuntimeError):
    """llama_decode failed."""


class InvalidBatchError(DecodeError, ValueError):
    """llama.cpp refused a batch as invalid (llama_decode returned -1)."""


class DecodeAborted(DecodeError):
    """A decode was stopped by Context.abort() (Ctrl+C raises KeyboardInterrupt instead)."""


class ClosedError(Alpaca2Error, ValueError):
    """A method was called on a closed Model, Context or Sampler."""


class TokenizeError(Alpaca2Error, ValueError):
    """Text could not be tokenized, or token ids are out of range."""


class StateError(Alpaca2Error, OSError):
    """A saved state or session file could not be written or read back."""


class GrammarError(Alpaca2Error, ValueError):
    """A GBNF grammar could not be parsed, or it rejects the token being accepted."""


class SamplerError(Alpaca2Error, RuntimeError):
    """llama.cpp's sampler chain failed (e.g. logits longer than the vocabulary)."""


class IncompleteChainError(SamplerError, ValueError):
    """A sampler chain with no final stage that picks the token (dist, greedy, mirostat)."""


class ArgumentTypeError(Alpaca2Error, TypeError):
    """An argument of the wrong type (a float, str or complex where an int is needed, ...)."""


class ArgumentValueError(Alpaca2Error, ValueError):
    """An argument out of its range (a size, count, id or seed), or NaN where a number is needed."""


__all__ = [
    "Alpaca2Error", "ModelLoadError", "ContextFullError", "DecodeError", "DecodeAborted",
    "ClosedError", "TokenizeError", "StateError", "GrammarError", "SamplerError", "VocabMismatchError",
    "OutOfMemoryError", "RPCServerError", "ArgumentTypeError", "ArgumentValueError", "InvalidBatchError",
    "IncompleteChainError",
]


class VocabMismatchError(Alpaca2Error, ValueError):
    """A draft model whose vocabulary is not the target model's (speculative decoding)."""


class RPCServerError(Alpaca2Error, ConnectionError):
    """An RPC server holding part of a model has gone (llama.cpp's RPC backend, alpaca2.rpc)."""


class OutOfMemoryError(Alpaca2Error, MemoryError):
    """What was asked for (a KV cache for n_ctx tokens) cannot fit in this machine's memory."""
