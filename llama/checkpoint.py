"""Meta's checkpoint format: `consolidated.NN.pth` shards + `params.json`, read for any model-parallel size.

A checkpoint written for N processes can be loaded on M: each rank reads, from memory-mapped shards, only the
slices of the full tensors it keeps. How a tensor is split is data (SPLIT_DIM), shared by reading and writing.
A `Checkpoint` indexes which file holds which rows of each full tensor; Meta's shards and Hugging Face's files
(llama/hf.py) are two kinds of it, read by the same `load_rank_state_dict`.
"""

import collections
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Tuple, Union

import fairscale.nn.model_parallel.layers as fs_layers
import torch

from llama.config import ModelArgs

# Which dim of the full tensor each module's weight is split on across ranks; absent means replicated (norms).
SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel: output features
    "wo": 1, "w2": 1, "tok_embeddings": 1,  # row-parallel: input features; the embedding splits its dim
}
KV_MODULES = ("wk", "wv")
QUANTIZATION_FILE = "quantization.json"  # present in pre-quantized checkpoints: their scheme (see linear.py)
IGNORED_KEYS = ("rope.freqs",)  # Meta's files carry the rotary table; the model recomputes it
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth$")
# Bytes of tensors read through one memory mapping of a file before it is let go: the pages read stay resident
# while it is mapped, so this bounds the host memory loading needs beyond what a rank keeps.
READ_CHUNK_BYTES = 1 << 28


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


@dataclass(frozen=True)
class Piece:
    """Part of a full tensor (in Meta's layout) stored in one file: rows [offset, offset + shape[dim]) on its split
    dim, or the whole tensor when it is not split."""

    file: str
    name: str  # the tensor's name inside the file
    offset: int
    shape: Tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """A checkpoint directory indexed without reading weights: `pieces` maps each Meta key to the Pieces that make
    up its full tensor; `open(file)` yields read(key, piece, dim, start, length) for Meta's view of a piece's rows."""

    path: str
    config_file: str  # params.json or config.json, named in errors
    params: dict  # in params.json's terms
    files: List[str]
    pieces: Dict[str, List[Piece]]

    def open(self, file: str) -> ContextManager[Callable[[str, Piece, Optional[int], int, int], torch.Tensor]]:
        raise NotImplementedError

    def name_in_files(self, key: str) -> str:
        """How the files call the tensor Meta calls `key`."""
        return key

    def full_shape(self, key: str) -> Tuple[int, ...]:
        pieces, dim = self.pieces[key], split_dim(key)
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)

    def model_args(self, **overrides) -> ModelArgs:
        """ModelArgs from the config; a vocab_size of -1 (Meta's "from the tokenizer") is read off the embedding."""
        args = ModelArgs.from_params(self.params, **overrides)
        if args.vocab_size == -1 and "tok_embeddings.weight" in self.pieces:
            args.vocab_size = self.full_shape("tok_embeddings.weight")[0]
        return args


class MetaCheckpoint(Checkpoint):
    """consolidated.NN.pth shards + params.json, written for any model-parallel size."""

    config_file = "params.json"

    def __init__(self, ckpt_dir: str):
        self.path = ckpt_dir
        self.params = read_params(ckpt_dir)
        self.files = find_shards(ckpt_dir)
        self.pieces = self._index()

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
        pieces = {}
        for key in sorted(keys):
            dim = split_dim(key)
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
            elif module_name(key) in KV_MODULES and n > args.n_kv_heads:
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


def open_checkpoint(path: str) -> Checkpoint:
    """A Meta (params.json + consolidated.NN.pth) or Hugging Face (config.json + weights) checkpoint directory, told
    apart by the files it holds."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    names = os.listdir(path)
    if QUANTIZATION_FILE in names:
        raise ValueError(
            f"{path} is a pre-quantized checkpoint: Llama.build loads it as it is, but it cannot be resharded or "
            "exported; convert the full-precision checkpoint it was made from instead"
        )
    if any(SHARD_PATTERN.fullmatch(n) for n in names) or ("params.json" in names and "config.json" not in names):
        return MetaCheckpoint(path)
    if "config.json" in names:
        from llama.hf import HFCheckpoint  # hf builds on this module

        return HFCheckpoint(path)
    raise FileNotFoundError(
        f"no params.json (Meta format) or config.json (Hugging Face format) in {path}: is it a checkpoint directory?"
    )


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every weight's unsharded shape, keyed as in Meta's files, in Hugging Face's file order."""
    hd, dim, hidden = args.head_dim, args.dim, args.ffn_hidden_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    layer = {
        "attention.wq.weight": (q, dim), "attention.wk.weight": (kv, dim), "attention.wv.weight": (kv, dim),
        "attention.wo.weight": (dim, q), "feed_forward.w1.weight": (hidden, dim),
        "feed_forward.w2.weight": (dim, hidden), "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
    }
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes.update({"norm.weight": (dim,), "output.weight": (args.vocab_size, dim)})
    return shapes


def check_shapes(source: Checkpoint, args: ModelArgs) -> None:
    """The checkpoint holds exactly the weights its config describes, each with the full shape it implies."""
    expected = full_shapes(args)
    missing = sorted(source.name_in_files(k) for k in set(expected) - set(source.pieces))
    unexpected = sorted(source.name_in_files(k) for k in set(source.pieces) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint in {source.path} does not match its {source.config_file}: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}"
        )
    for key, shape in expected.items():
        if source.full_shape(key) != shape:
            raise ValueError(
                f"{source.name_in_files(key)} in {source.pieces[key][0].file} has full shape {source.full_shape(key)}, "
                f"but {os.path.join(source.path, source.config_file)} (dim={args.dim}, n_heads={args.n_heads}, "
                f"n_kv_heads={args.n_kv_heads}, FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}) implies {shape}: "
                f"the weights and {source.config_file} do not belong together"
            )


def rank_rows(key: str, full: int, args: ModelArgs, rank: int, world: int) -> Tuple[int, int]:
    """Rows [start, stop) of key's split dim (`full` rows in all) that model-parallel rank `rank` of `world` keeps."""
    if module_name(key) in KV_MODULES and world > args.n_kv_heads:
        head = rank * args.n_kv_heads // world  # this KV head is replicated on world / n_kv_heads ranks
        return head * args.head_dim, (head + 1) * args.head_dim
    if full % world:
        raise ValueError(f"{key} has {full} rows on dim {split_dim(key)}, not divisible by {world} processes")
    per_rank = full // world
    return rank * per_rank, (rank + 1) * per_rank


def load_rank_state_dict(
    source: Union[str, Checkpoint],
    args: ModelArgs,
    rank: int,
    world: int,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    keys: Optional[Iterable[str]] = None,
    views: bool = True,
) -> Dict[str, torch.Tensor]:
    """The tensors (all, or `keys`) model-parallel rank `rank` of `world` keeps, in dtype (None: as stored) on device.

    Files are read one after another, each only for the rows this rank keeps and through mappings let go every
    READ_CHUNK_BYTES, so host memory peaks near what the rank keeps plus one chunk. Where every tensor read through a
    mapping is stored as the rank keeps it (same rows, dtype, layout, on the CPU), they stay views of the mapped file:
    no copy at all, and pages are read when first used. views=False always copies, for callers that convert each
    tensor again and free it (a surviving view would keep its whole mapping resident).
    """
    if isinstance(source, str):
        source = open_checkpoint(source)
    check_shapes(source, args)
    device = torch.device(device)
    jobs = collections.defaultdict(list)  # file -> [(key, piece, dim, start in piece, start in target, length)]
    targets = {}  # key -> (shape this rank keeps, number of pieces it is read from)
    for key in keys if keys is not None else source.pieces:
        pieces, dim = source.pieces[key], split_dim(key)
        if dim is None:
            jobs[pieces[0].file].append((key, pieces[0], None, 0, 0, 0))
            targets[key] = (pieces[0].shape, 1)
            continue
        shape = list(source.full_shape(key))
        start, stop = rank_rows(key, shape[dim], args, rank, world)
        shape[dim] = stop - start
        overlaps = [(p, max(start, p.offset), min(stop, p.offset + p.shape[dim])) for p in pieces]
        overlaps = [(p, lo, hi) for p, lo, hi in overlaps if lo < hi]
        for p, lo, hi in overlaps:
            jobs[p.file].append((key, p, dim, lo - p.offset, lo - start, hi - lo))
        targets[key] = (tuple(shape), len(overlaps))

    state = {}
    for file in source.files:
        for chunk in _chunks(jobs.get(file, []), READ_CHUNK_BYTES):
            _read_chunk(source, file, chunk, targets, state, dtype, device, views)
    return state


def _chunks(jobs: list, max_bytes: int) -> Iterable[list]:
    """Consecutive runs of jobs whose pieces add up to at most max_bytes (or one piece, if larger)."""
    chunk, size = [], 0
    for job in jobs:
        piece = job[1]
        nbytes = math.prod(piece.shape) * piece.dtype.itemsize
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(job)
        size += nbytes
    if chunk:
        yield chunk


def _read_chunk(source: Checkpoint, file: str, jobs: list, targets: dict, state: dict, dtype, device, views) -> None:
    """Do jobs (see load_rank_state_dict) through one mapping of file, into state."""
    kept_views, copied = [], False
    with source.open(file) as read:
        for key, piece, dim, src_start, dst_start, length in jobs:
            src = read(key, piece, dim, src_start, length)
            shape, n_pieces = targets[key]
            target_dtype = dtype or src.dtype
            if views and n_pieces == 1 and src.dtype == target_dtype and src.device == device and src.is_contiguous():
                state[key] = src
                kept_views.append(key)
                continue
            if key not in state:
                state[key] = torch.empty(shape, dtype=target_dtype, device=device)
            (state[key] if dim is None else state[key].narrow(dim, dst_start, length)).copy_(src)
            copied = True
    if copied:  # a view would keep the mapping resident, with the pages read for the copies
        for key in kept_views:
            state[key] = state[key].clone()


def release_freed_host_memory() -> None:
    """Hand host memory that loading freed back to the OS. glibc keeps freed blocks of up to 32 MiB in its heap, so
    the temporaries of converting weights one by one stayed resident (0.4-0.5 GB after an int8 build of the 1.1B
    shape, ~30% of it); malloc_trim returns them. Does nothing where the C library has no malloc_trim."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl), or no process handle (Windows)
        return
    malloc_trim(0)


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
    """Cut a full (unsharded) state dict into the `world` shards Meta's layout gives model-parallel ranks (views)."""
    args.check_model_parallel_size(world)
    shards = []
    for rank in range(world):
        shard = {}
        for key, t in full.items():
            dim = split_dim(key)
            if dim is None:
                shard[key] = t
            else:
                start, stop = rank_rows(key, t.shape[dim], args, rank, world)
                shard[key] = t.narrow(dim, start, stop - start)
        shards.append(shard)
    return shards


def compact(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous storage of its own: torch.save and safetensors would write a view's whole storage."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def md5sum(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yield a temporary sibling folder that is renamed to `path` when the block completes and removed if it fails,
    so an interrupted write never leaves anything at `path`."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; remove it or choose another destination")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield tmp_dir
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private
        os.rename(tmp_dir, path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def save_checkpoint(
    ckpt_dir: str, params: dict, shards: Iterable[Dict[str, torch.Tensor]], tokenizer_path: Optional[str] = None,
    extra_json: Optional[Dict[str, dict]] = None,
) -> None:
    """Write consolidated.NN.pth, params.json, any extra_json files ({name: content}) and checklist.chk (md5sum
    format), plus a copy of tokenizer_path if given, into ckpt_dir atomically. `shards` may be a generator, so only
    one shard need be in memory."""
    with atomic_directory(ckpt_dir) as tmp_dir:
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
