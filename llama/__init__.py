"""Inference for Meta's Llama 2 checkpoints, drop-in compatible with Meta's reference release."""

import importlib

# Each public name is imported when first used, so that a tool such as the converter, which only reads and writes
# files, does not load the model-parallel stack and the kernels.
_EXPORTS = {"Llama": "llama.generation", "Dialog": "llama.dialog", "Message": "llama.dialog",
            "Tokenizer": "llama.tokenizer", "ModelArgs": "llama.config", "Transformer": "llama.model"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
