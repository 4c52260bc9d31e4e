"""Checkpoint formats, one family (see base.py): Meta's shards, Hugging Face's files and pre-quantized shards, told
apart by the files a directory holds."""

import os

from llama.formats.base import Checkpoint
from llama.formats.hf import HFCheckpoint
from llama.formats.meta import SHARD_PATTERN, MetaCheckpoint
from llama.formats.quantized import QUANTIZATION_FILE, QuantizedCheckpoint


def open_checkpoint(path: str) -> Checkpoint:
    """A Meta (params.json + consolidated.NN.pth), pre-quantized (the same with quantization.json) or Hugging Face
    (config.json + weights) checkpoint directory, told apart by the files it holds."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    names = os.listdir(path)
    if QUANTIZATION_FILE in names:
        return QuantizedCheckpoint(path)
    if any(SHARD_PATTERN.fullmatch(n) for n in names) or ("params.json" in names and "config.json" not in names):
        return MetaCheckpoint(path)
    if "config.json" in names:
        return HFCheckpoint(path)
    raise FileNotFoundError(
        f"no params.json (Meta format) or config.json (Hugging Face format) in {path}: is it a checkpoint directory?"
    )
