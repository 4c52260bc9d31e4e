"""Meta's checkpoint format: `consolidated.NN.pth` shards + `params.json`, read for any model-parallel size.

A checkpoint written for N processes can be loaded on M: each rank reads, from memory-mapped shards, only the
slices of the full tensors it keeps. How a tensor is split is data (SPLIT_DIM), shared by reading and writing.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional

import fairscale.nn.model_parallel.layers as fs_layers
import torch

from llama.model import ModelArgs

# Which dim of the full tensor each module's weight is split on across ranks; absent means replicated (norms).
SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel: output features
    "wo": 1, "w2": 1, "tok_embeddings": 1,  # row-parallel: input features; the embedding splits its dim
}
KV_MODULES = ("wk", "wv")
IGNORED_KEYS = ("rope.freqs",)  # Meta's files carry the rotary table; the model recomputes it
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth$")


def module_name(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'."""
    return key.split(".")[-2]


def split_dim(key: str) -> Optional[int]:
    """The dim a weight is split on across ranks: 'layers.3.attention.wq.weight' -> 0; norms -> None."""
    return SPLIT_DIM.get(module_name(key))


def shard_path(ckpt_dir: str, index: int) -> str:
    return os.path.join(ckpt_dir, f"consolidated.{index:02d}.pth")


def find_shards(ckpt_dir: str) -> List[str]:
    """Paths of consolidated.00.pth .. consolidated.NN.pth, checking that no index is missing."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    indices = sorted(int(m.group(1)) for name in os.listdir(ckpt_dir) if (m := SHARD_PATTERN.fullmatch(name)))
    if not indices:
        raise FileNotFoundError(f"no checkpoint files (consolidated.NN.pth) in {ckpt_dir}")
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        raise FileNotFoundError(f"{ckpt_dir} is missing shard(s) {[os.path.basename(shard_path(ckpt_dir, i)) for i in missing]}")
    return [shard_path(ckpt_dir, i) for i in indices]


def read_params(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no params.json in {ckpt_dir}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def load_shard(path: str) -> Dict[str, torch.Tensor]:
    """Memory-map one shard without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _logical_pieces(key: str, shards: List[Dict[str, torch.Tensor]], n_kv_heads: int) -> List[torch.Tensor]:
    """The shard tensors that, concatenated on the split dim, form the full tensor.

    A checkpoint written for more processes than KV heads stores each KV head on several shards; keep one copy.
    """
    pieces = [shard[key] for shard in shards]
    if module_name(key) in KV_MODULES and len(shards) > n_kv_heads:
        pieces = pieces[:: len(shards) // n_kv_heads]
    return pieces


def _slice_rows(pieces: List[torch.Tensor], dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) on dim of the concatenation of pieces, reading only the pieces that overlap."""
    out, offset = [], 0
    for piece in pieces:
        size = piece.shape[dim]
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            out.append(piece.narrow(dim, lo - offset, hi - lo))
        offset += size
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


def rank_slice(key: str, pieces: List[torch.Tensor], args: ModelArgs, rank: int, world: int) -> torch.Tensor:
    """The part of the full tensor (given as pieces) that model-parallel rank `rank` of `world` keeps."""
    dim = split_dim(key)
    if dim is None:
        return pieces[0]
    full = sum(p.shape[dim] for p in pieces)
    if module_name(key) in KV_MODULES and world > args.n_kv_heads:
        head = rank * args.n_kv_heads // world  # this KV head is replicated on world / n_kv_heads ranks
        return _slice_rows(pieces, dim, head * args.head_dim, (head + 1) * args.head_dim)
    if full % world:
        raise ValueError(f"{key} has {full} rows on dim {dim}, not divisible by {world} processes")
    per_rank = full // world
    return _slice_rows(pieces, dim, rank * per_rank, (rank + 1) * per_rank)


def load_rank_state_dict(
    ckpt_dir: str, args: ModelArgs, rank: int, world: int, dtype: torch.dtype, device: torch.device
) -> Dict[str, torch.Tensor]:
    """The state dict model-parallel rank `rank` of `world` needs, in dtype on device, from shards of any count."""
    paths = find_shards(ckpt_dir)
    shards = [load_shard(p) for p in paths]
    keys = set(shards[0]) - set(IGNORED_KEYS)
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) - set(IGNORED_KEYS) != keys:
            diff = sorted(keys.symmetric_difference(set(shard) - set(IGNORED_KEYS)))[:5]
            raise ValueError(f"{path} has different keys from {paths[0]} (e.g. {diff}); shards must come from one checkpoint")
    state = {}
    for key in sorted(keys):
        pieces = _logical_pieces(key, shards, args.n_kv_heads)
        state[key] = rank_slice(key, pieces, args, rank, world).to(device=device, dtype=dtype).contiguous()
    return state


@contextlib.contextmanager
def no_fairscale_init():
    """Build fairscale layers without materialising and scattering a full master weight per layer.

    With more than one process fairscale fills every weight from a full-size master copy; we replace the weights
    with the checkpoint's right after, so that work (and the resident memory it touches) is pure waste.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


def split_state_dict(full: Dict[str, torch.Tensor], args: ModelArgs, world: int) -> List[Dict[str, torch.Tensor]]:
    """Cut a full (unsharded) state dict into the `world` shards Meta's layout gives model-parallel ranks."""
    args.check_model_parallel_size(world)
    # clone: torch.save of a view would write the whole underlying tensor into every shard
    return [{key: rank_slice(key, [t], args, rank, world).clone() for key, t in full.items()} for rank in range(world)]


def md5sum(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(ckpt_dir: str, params: dict, shards: List[Dict[str, torch.Tensor]]) -> None:
    """Write consolidated.NN.pth, params.json and checklist.chk (md5sum format) into ckpt_dir, atomically:
    everything goes to a temporary sibling folder renamed into place when complete."""
    if os.path.exists(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already exists; remove it or choose another destination")
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(ckpt_dir)}.partial-", dir=parent)
    try:
        names = []
        for index, shard in enumerate(shards):
            torch.save(shard, shard_path(tmp_dir, index))
            names.append(os.path.basename(shard_path(tmp_dir, index)))
        with open(os.path.join(tmp_dir, "params.json"), "w") as f:
            json.dump(params, f)
        names.append("params.json")
        with open(os.path.join(tmp_dir, "checklist.chk"), "w") as f:
            f.writelines(f"{md5sum(os.path.join(tmp_dir, name))}  {name}\n" for name in names)
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private
        os.rename(tmp_dir, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
