"""Tiny random checkpoints in Meta's exact format and a tokenizer trained like Llama's, for tests and demos.

    python -m llama.tiny DIR [--config mha|gqa] [--n_shards 1] [--seed 0]

writes DIR/tokenizer.model and DIR/<config>/ (consolidated.NN.pth, params.json, checklist.chk), which
example_text_completion.py runs like real weights (the text it generates is random).
"""

import io
import os
import random
from typing import Dict

import sentencepiece as spm
import torch

from llama import weights
from llama.cli import run
from llama.formats.base import split_state_dict
from llama.formats.meta import save_checkpoint
from llama.config import DTYPES, ModelArgs

CONFIGS = {
    # multi-head attention, like 7B and 13B
    "mha": {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1},
    # grouped-query attention with ffn_dim_multiplier, like 70B
    "gqa": {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5, "rope_theta": 1e6, "vocab_size": -1},
}
TOKENIZER_VOCAB = 512

_WORDS = (
    "the a an of to and in is was for on that with as it by at from this be are or his her they we you he she "
    "llama model token weight layer head attention cache prompt answer question paris france capital city river "
    "mountain physics gravity simple theory relativity people believe think say happy birthday team launch hello "
    "world translate english french cheese sea otter peppermint plush giraffe mayonnaise recipe cook time day year "
    "system user assistant reply always speak only emoji language function code python number one two three"
).split()


def _corpus(seed: int, n_lines: int = 3000):
    rng = random.Random(seed)
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        line = " ".join(words)
        if rng.random() < 0.3:
            line = f"[INST] {line} [/INST] {rng.randint(0, 999)}."
        if rng.random() < 0.1:
            line = f"<<SYS>>\n{line.capitalize()}!\n<</SYS>>"
        yield line


def train_tokenizer(path: str, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0) -> None:
    """Train a SentencePiece BPE model with Llama's settings: byte fallback, digits split, unk 0, bos 1, eos 2,
    no pad. A vocab larger than the small corpus supports (Llama's 32000, for benchmarks) is filled with
    placeholder pieces."""
    model = io.BytesIO()
    placeholders = [f"<extra_{i}>" for i in range(max(0, vocab_size - TOKENIZER_VOCAB))]
    spm.SentencePieceTrainer.train(
        user_defined_symbols=placeholders,
        sentence_iterator=_corpus(seed),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


def random_state_dict(args: ModelArgs, seed: int, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A full (unsharded) state dict with Meta's keys (llama/weights.py's table): linears random and scaled by
    fan-in, norms random around 1, the embedding standard normal (Meta's `rope.freqs` entry is added per shard by
    make_checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in weights.full_shapes(args).items():  # each cast as it is made: a 7B shape never is in fp32
        if weights.weight(key).linear:
            state[key] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)
        elif len(shape) == 1:  # a norm
            state[key] = (1.0 + 0.2 * torch.randn(shape, generator=gen)).to(dtype)
        else:  # the embedding
            state[key] = torch.randn(shape, generator=gen).to(dtype)
    return state


def make_checkpoint(ckpt_dir: str, params: dict, vocab_size: int, n_shards: int = 1, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write a random checkpoint for `params` (a params.json dict) split into n_shards as Meta splits."""
    args = ModelArgs.from_params(params, vocab_size=vocab_size)
    full = random_state_dict(args, seed, dtype)
    shards = split_state_dict(full, args, n_shards)
    for shard in shards:
        shard["rope.freqs"] = args.rotary_frequencies()
    save_checkpoint(ckpt_dir, params, shards)


def main(out_dir: str, config: str = "mha", n_shards: int = 1, seed: int = 0, dtype: str = "fp32") -> None:
    """Write OUT_DIR/tokenizer.model and OUT_DIR/CONFIG/, a random checkpoint in Meta's format."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {sorted(CONFIGS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    ckpt_dir = os.path.join(out_dir, config)
    if os.path.exists(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already exists; remove it or write to another folder")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_path = os.path.join(out_dir, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        train_tokenizer(tokenizer_path)
    make_checkpoint(ckpt_dir, CONFIGS[config], TOKENIZER_VOCAB, n_shards, seed, DTYPES[dtype])
    print(f"wrote {tokenizer_path} and {ckpt_dir}/ ({n_shards} shard(s))")


if __name__ == "__main__":
    run(main, "python -m llama.tiny")
