"""Meta's checkpoint format: `consolidated.NN.pth` shards + `params.json` (+ `checklist.chk`), written for any
model-parallel size and read for any other."""

import contextlib
import json
import os
import re
import shutil
from typing import Dict, Iterable, List, Optional

import torch

from llama import weights
from llama.config import ModelArgs
from llama.formats.base import Checkpoint, Piece, atomic_directory, compact, load_shard, md5sum

IGNORED_KEYS = ("rope.freqs",)  # Meta's files carry the rotary table; the model recomputes it
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth$")


def shard_path(ckpt_dir: str, index: int) -> str:
    return os.path.join(ckpt_dir, f"consolidated.{index:02d}.pth")


def find_shards(ckpt_dir: str) -> List[str]:
    """Paths of consolidated.00.pth .. consolidated.NN.pth, checking that no index is missing."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    indices = sorted(int(m.group(1)) for name in os.listdir(ckpt_dir) if (m := SHARD_PATTERN.fullmatch(name)))
    if not indices:
        raise FileNotFoundError(f"no checkpoint files (consolidated.NN.pth) in {ckpt_dir}")
    listed = checklist_shards(ckpt_dir)
    absent = sorted(set(listed) - {os.path.basename(shard_path(ckpt_dir, i)) for i in indices})
    if absent:
        raise FileNotFoundError(f"{ckpt_dir} is missing {', '.join(absent)}, which its checklist.chk lists: the "
                                "download or copy is incomplete")
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        raise FileNotFoundError(f"{ckpt_dir} is missing shard(s) {[os.path.basename(shard_path(ckpt_dir, i)) for i in missing]}")
    return [shard_path(ckpt_dir, i) for i in indices]


def checklist_shards(ckpt_dir: str) -> List[str]:
    """The consolidated.NN.pth files the folder's checklist.chk (md5sum's format) names; none without one."""
    path = os.path.join(ckpt_dir, "checklist.chk")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        names = [line.split()[-1] for line in f if line.strip()]
    return [name for name in names if SHARD_PATTERN.fullmatch(name)]


def read_params(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no params.json in {ckpt_dir}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


class MetaCheckpoint(Checkpoint):
    """consolidated.NN.pth shards + params.json, written for any model-parallel size."""

    config_file = "params.json"

    def __init__(self, ckpt_dir: str):
        self.path = ckpt_dir
        self.params = read_params(ckpt_dir)
        self.files = find_shards(ckpt_dir)
        self.vocab_split = False  # the embedding's shards split the vocabulary (Llama 3), told by their shape
        self.pieces = self._index()

    def stacked_dim(self, key: str) -> Optional[int]:
        return 0 if self.vocab_split and key == "tok_embeddings.weight" else self.split_dim(key)

    def _index(self) -> Dict[str, List[Piece]]:
        args = ModelArgs.from_params(self.params)
        n = len(self.files)
        if n not in args.valid_model_parallel_sizes():
            raise ValueError(
                f"{self.path} holds {n} shards, but its params.json (n_heads={args.n_heads}, n_kv_heads="
                f"{args.n_kv_heads}) cannot be split {n} ways; the shards and params.json do not belong together"
            )
        shards = [load_shard(p) for p in self.files]  # memory-mapped: only names and shapes are read here
        keys = set(shards[0]) - set(IGNORED_KEYS)
        for path, shard in zip(self.files[1:], shards[1:]):
            if set(shard) - set(IGNORED_KEYS) != keys:
                diff = sorted(keys.symmetric_difference(set(shard) - set(IGNORED_KEYS)))[:5]
                raise ValueError(
                    f"{path} has different keys from {self.files[0]} (e.g. {diff}); shards must come from one "
                    "checkpoint"
                )
        embedding = shards[0].get("tok_embeddings.weight")
        self.vocab_split = n > 1 and embedding is not None and embedding.dim() == 2 and embedding.shape[1] == args.dim
        pieces = {}
        for key in sorted(keys):
            dim = self.stacked_dim(key)
            first = shards[0][key]
            for path, shard in zip(self.files[1:], shards[1:]):
                t = shard[key]
                unsplit = [d for d in range(first.dim()) if d != dim]
                if t.dim() != first.dim() or any(t.shape[d] != first.shape[d] for d in unsplit):
                    where = "it is not split, so" if dim is None else f"only dim {dim} is split, so the others"
                    raise ValueError(
                        f"{path} and {self.files[0]} disagree on the shape of {key} ({tuple(t.shape)} vs "
                        f"{tuple(first.shape)}); {where} must match: shards must come from one checkpoint"
                    )
            if dim is None:
                kept = [0]
            elif weights.weight(key).kv_heads and n > args.n_kv_heads:
                kept = range(0, n, n // args.n_kv_heads)  # each KV head is stored on n / n_kv_heads shards: read one
            else:
                kept = range(n)
            pieces[key], offset = [], 0
            for i in kept:
                t = shards[i][key]
                pieces[key].append(Piece(self.files[i], key, offset, tuple(t.shape), t.dtype))
                offset += t.shape[dim] if dim is not None else 0
        return pieces

    @contextlib.contextmanager
    def open(self, file: str):
        shard = load_shard(file)
        yield lambda key, piece, dim, start, length: (
            shard[piece.name] if dim is None else shard[piece.name].narrow(dim, start, length)
        )


def save_checkpoint(
    ckpt_dir: str, params: dict, shards: Iterable[Dict[str, torch.Tensor]], tokenizer_path: Optional[str] = None,
    extra_json: Optional[Dict[str, dict]] = None, expected_bytes: int = 0,
) -> None:
    """Write consolidated.NN.pth, params.json, any extra_json files ({name: content}) and checklist.chk (md5sum
    format), plus a copy of tokenizer_path if given, into ckpt_dir atomically. `shards` may be a generator, so only
    one shard need be in memory. expected_bytes: about how much the shards hold, checked against the free space."""
    with atomic_directory(ckpt_dir, expected_bytes) as tmp_dir:
        names = []
        for shard in shards:  # not enumerate: its cached result tuple would keep the last shard while the next is made
            path = shard_path(tmp_dir, len(names))
            torch.save({key: compact(t) for key, t in shard.items()}, path)
            names.append(os.path.basename(path))
            del shard
        for name, content in {"params.json": params, **(extra_json or {})}.items():
            with open(os.path.join(tmp_dir, name), "w") as f:
                json.dump(content, f)
            names.append(name)
        with open(os.path.join(tmp_dir, "checklist.chk"), "w") as f:
            f.writelines(f"{md5sum(os.path.join(tmp_dir, name))}  {name}\n" for name in names)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp_dir, "tokenizer.model"))
