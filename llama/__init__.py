"""Inference for Meta's Llama 2 checkpoints, drop-in compatible with Meta's reference release."""

from llama.chat import Dialog, Message
from llama.config import ModelArgs
from llama.generation import Llama
from llama.model import Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer"]
