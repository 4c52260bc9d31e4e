"""The tokenizers of Llama's tokenizer.model files, told apart by the file's content: Llama 2's SentencePiece model,
or Llama 3's tiktoken BPE ranks (one base64 token and its rank per line) with Meta's pre-tokenization pattern and
256 special tokens after the ordinary ones. Both encode text as text: a special token's name in it is never a
control token."""

import base64
import binascii
import os
import re
from typing import Dict, Iterator, List

import tiktoken
from sentencepiece import SentencePieceProcessor

TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")  # a line of a tiktoken BPE file: base64 token, space, rank


def tokenizer_kind(model_path: str) -> str:
    """"tiktoken" when the file's first line is a tiktoken BPE line, else "sentencepiece" (a SentencePiece model's
    protobuf starts with the tag of its pieces, byte 0x0a, a newline: its first line is empty)."""
    with open(model_path, "rb") as f:
        first = f.readline(1024).rstrip(b"\r\n")
    return "tiktoken" if TIKTOKEN_LINE.fullmatch(first) else "sentencepiece"


class Tokenizer:
    """Tokenizer(path) is the tokenizer the file holds: a SentencePieceTokenizer or a TiktokenTokenizer. Both have
    n_words, bos_id, eos_id, pad_id, stop_ids (the ids that end a generation), kind, encode and decode."""

    kind: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: List[int]  # a property: EOS first, then any other token that ends a generation

    def __new__(cls, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path} (pass --tokenizer_path tokenizer.model)")
        if cls is Tokenizer:
            cls = TiktokenTokenizer if tokenizer_kind(model_path) == "tiktoken" else SentencePieceTokenizer
        return super().__new__(cls)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of s, with BOS prepended and EOS appended when asked."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}")
        return [self.bos_id] * bos + self._encode(s) + [self.eos_id] * eos

    def _encode(self, s: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (part of a character for some)."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's: SentencePiece with byte fallback; BOS 1, EOS 2, no pad."""

    kind = "sentencepiece"

    def __init__(self, model_path: str):
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{model_path} is not a SentencePiece model: {err}") from err
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama: no pad token

    @property
    def stop_ids(self) -> List[int]:
        return [self.eos_id]

    def _encode(self, s: str) -> List[int]:
        return self.sp_model.encode(s)

    def decode(self, ids: List[int]) -> str:
        return self.sp_model.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        piece = self.sp_model.IdToPiece(token)  # a byte-fallback piece "<0xNN>", or text with "\u2581" for a space
        return bytes([int(piece[3:-1], 16)]) if self.sp_model.IsByte(token) else piece.replace("\u2581", " ").encode()


# Meta's Llama 3 pre-tokenization pattern (cl100k's), and its special tokens in id order after the ordinary ones
# (meta-llama/llama-models, models/llama3/tokenizer.py), then reserved ones up to 256 in all.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                         "<|image|>")
LLAMA3_N_SPECIALS = 256
LLAMA3_SPECIALS = LLAMA3_NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_N_SPECIALS - len(LLAMA3_NAMED_SPECIALS)))
# tiktoken's Rust core overflows its stack on very long runs without (or of) whitespace: Meta encodes strings in
# slices of at most this many characters, and runs in slices of at most MAX_RUN_CHARS (tiktoken issue #195).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def read_tiktoken_ranks(model_path: str) -> Dict[bytes, int]:
    """A tiktoken BPE file's {token bytes: rank}, checked: ranks 0..N-1, each once."""
    ranks = {}
    with open(model_path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as err:
                raise ValueError(f"{model_path}, line {number}: not a tiktoken BPE line (base64 token, rank): "
                                 f"{line[:60]!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{model_path}: the ranks of a tiktoken BPE file must be 0..{len(ranks) - 1}, each once")
    return ranks


def split_long_runs(s: str) -> Iterator[str]:
    """s in slices that tiktoken encodes safely, cut where Meta's tokenizer cuts them (the tokens are Meta's)."""
    for start in range(0, len(s), MAX_ENCODE_CHARS):
        chunk = s[start : start + MAX_ENCODE_CHARS]
        begin, run, space = 0, 0, chunk[:1].isspace()
        for i, char in enumerate(chunk):
            if char.isspace() != space:
                run, space = 1, char.isspace()
            else:
                run += 1
                if run > MAX_RUN_CHARS:
                    yield chunk[begin:i]
                    begin, run = i, 1
        yield chunk[begin:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3's: byte-level BPE ranks run by tiktoken with Meta's pattern and special tokens; BOS is
    <|begin_of_text|>, EOS <|end_of_text|>, and a generation also stops at <|eot_id|> and <|eom_id|>."""

    kind = "tiktoken"

    def __init__(self, model_path: str):
        ranks = read_tiktoken_ranks(model_path)
        self.special_ids = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
        self.model = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=LLAMA3_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_ids)
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_ids["<|begin_of_text|>"]
        self.eos_id: int = self.special_ids["<|end_of_text|>"]
        self.pad_id: int = self.special_ids["<|finetune_right_pad_id|>"]

    @property
    def stop_ids(self) -> List[int]:
        return [self.eos_id, self.special_ids["<|eom_id|>"], self.special_ids["<|eot_id|>"]]

    def _encode(self, s: str) -> List[int]:
        # encode_ordinary: special tokens' names in s are text, never control tokens
        return [t for piece in split_long_runs(s) for t in self.model.encode_ordinary(piece)]

    def decode(self, ids: List[int]) -> str:
        return self.model.decode(ids)  # an incomplete UTF-8 sequence decodes to U+FFFD, as streaming expects

    def token_bytes(self, token: int) -> bytes:
        return self.model.decode_single_token_bytes(token)
