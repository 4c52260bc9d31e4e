"""Tiny random checkpoints in Meta's exact format and a tokenizer trained like Llama's, for tests and demos.

    python -m llama.tiny DIR [--config mha|gqa|llama3|llama3.2] [--n_shards 1] [--seed 0]

writes DIR/<config>/ (consolidated.NN.pth, params.json, checklist.chk), which example_text_completion.py runs like
real weights (the text it generates is random), and its tokenizer where Meta's downloads put it: Llama 2's
SentencePiece model beside the checkpoint (DIR/tokenizer.model), Llama 3's tiktoken file in it.
"""

import base64
import collections
import io
import os
import random
from typing import Dict

import regex
import sentencepiece as spm
import torch

from llama import weights
from llama.cli import run
from llama.formats.base import split_state_dict
from llama.formats.meta import save_checkpoint
from llama.config import DTYPES, LLAMA3_ROPE_THETA, ModelArgs
from llama.tokenizer import LLAMA3_N_SPECIALS, LLAMA3_PATTERN

CONFIGS = {
    # multi-head attention, like 7B and 13B
    "mha": {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1},
    # grouped-query attention with ffn_dim_multiplier, like 70B
    "gqa": {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5, "rope_theta": 1e6, "vocab_size": -1},
}
TOKENIZER_VOCAB = 512
# Llama 3.1-style (scaled rotary embeddings, 8 KV heads) and Llama 3.2-style (tied embedding and output, factor 32),
# with their tiny tiktoken tokenizer's vocabulary. Their original context is made short, so that the rescaling
# touches every band of their few rotary frequencies (kept, blended, stretched) and positions past it are cheap.
TIKTOKEN_VOCAB = 512  # ordinary tokens; Meta's 256 special tokens follow
LLAMA3_CONFIGS = {
    "llama3": {"dim": 128, "n_layers": 2, "n_heads": 16, "n_kv_heads": 8,
               "vocab_size": TIKTOKEN_VOCAB + LLAMA3_N_SPECIALS, "multiple_of": 32, "ffn_dim_multiplier": 1.3,
               "norm_eps": 1e-5, "rope_theta": LLAMA3_ROPE_THETA, "use_scaled_rope": True,
               "rope_old_context_len": 256},
    "llama3.2": {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2,
                 "vocab_size": TIKTOKEN_VOCAB + LLAMA3_N_SPECIALS, "multiple_of": 32, "ffn_dim_multiplier": 1.5,
                 "norm_eps": 1e-5, "rope_theta": LLAMA3_ROPE_THETA, "use_scaled_rope": True,
                 "rope_scaling_factor": 32.0, "rope_old_context_len": 256},
}
TIED_CONFIGS = ("llama3.2",)  # the output layer is the embedding, as in Llama 3.2 1B and 3B

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


def train_tiktoken(path: str, vocab_size: int = TIKTOKEN_VOCAB, seed: int = 0) -> None:
    """Train byte-level BPE ranks on the tiny corpus and write them as Llama 3's tokenizer.model (one base64 token
    and its rank per line): the 256 bytes, then, one merge at a time, the most frequent adjacent pair within the
    words Meta's pattern cuts, until vocab_size ordinary tokens."""
    text = "\n".join(_corpus(seed))
    counts = collections.Counter(piece.encode() for piece in regex.findall(LLAMA3_PATTERN, text))
    words = {tuple(bytes([b]) for b in word): n for word, n in counts.items()}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            raise ValueError(f"the tiny corpus has too few distinct pairs for {vocab_size} tokens")
        best = max(pairs, key=lambda pair: (pairs[pair], pair))  # ties: the larger pair, so training is repeatable
        ranks.setdefault(best[0] + best[1], len(ranks))
        words = {(_merge(word, best) if best[0] in word else word): n for word, n in words.items()}
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())


def _merge(word: tuple, pair: tuple) -> tuple:
    """word (a tuple of byte strings) with each occurrence of the adjacent pair joined."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


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
                    dtype: torch.dtype = torch.float32, tied: bool = False, tokenizer_path: str = None) -> None:
    """Write a random checkpoint for `params` (a params.json dict) split into n_shards as Meta splits; tied: the
    output layer a copy of the embedding (Llama 3.2 1B and 3B, whose Meta files store both); tokenizer_path: a
    tokenizer to copy into it."""
    args = ModelArgs.from_params(params, vocab_size=vocab_size)
    full = random_state_dict(args, seed, dtype)
    if tied:
        full["output.weight"] = full["tok_embeddings.weight"].clone()
    shards = split_state_dict(full, args, n_shards)
    for shard in shards:
        shard["rope.freqs"] = args.rotary_frequencies()
    save_checkpoint(ckpt_dir, params, shards, tokenizer_path)


def main(out_dir: str, config: str = "mha", n_shards: int = 1, seed: int = 0, dtype: str = "fp32") -> None:
    """Write OUT_DIR/CONFIG/, a random checkpoint in Meta's format, and its tokenizer (Llama 2's configs share
    OUT_DIR/tokenizer.model; Llama 3's hold theirs)."""
    if config not in {**CONFIGS, **LLAMA3_CONFIGS}:
        raise ValueError(f"unknown config {config!r}; choose one of {sorted(CONFIGS) + sorted(LLAMA3_CONFIGS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    ckpt_dir = os.path.join(out_dir, config)
    if os.path.exists(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already exists; remove it or write to another folder")
    os.makedirs(out_dir, exist_ok=True)
    if config in LLAMA3_CONFIGS:
        params = LLAMA3_CONFIGS[config]
        tokenizer_path = os.path.join(out_dir, f".{config}.tokenizer.model")  # copied into the checkpoint
        train_tiktoken(tokenizer_path, seed=seed)
        try:
            make_checkpoint(ckpt_dir, params, params["vocab_size"], n_shards, seed, DTYPES[dtype],
                            tied=config in TIED_CONFIGS, tokenizer_path=tokenizer_path)
        finally:
            os.remove(tokenizer_path)
        print(f"wrote {ckpt_dir}/ ({n_shards} shard(s), with its tokenizer.model)")
        return
    tokenizer_path = os.path.join(out_dir, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        train_tokenizer(tokenizer_path)
    make_checkpoint(ckpt_dir, CONFIGS[config], TOKENIZER_VOCAB, n_shards, seed, DTYPES[dtype])
    print(f"wrote {tokenizer_path} and {ckpt_dir}/ ({n_shards} shard(s))")


if __name__ == "__main__":
    run(main, "python -m llama.tiny")
