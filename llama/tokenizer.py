"""SentencePiece tokenizer with Llama's special ids."""

import os
from typing import List

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path} (pass --tokenizer_path tokenizer.model)")
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{model_path} is not a SentencePiece model: {err}") from err
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama: no pad token

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of s, with BOS prepended and EOS appended when asked."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: List[int]) -> str:
        return self.sp_model.decode(ids)
