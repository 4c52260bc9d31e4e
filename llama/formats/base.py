"""What every checkpoint format shares: a `Checkpoint` indexes which file holds which rows of each full tensor in
Meta's layout, and `load_rank_state_dict` reads, for any model-parallel size, only the slices a rank keeps, from
memory-mapped files. Meta's shards (meta.py), Hugging Face's files (hf.py) and pre-quantized shards (quantized.py)
are kinds of it; writing is atomic (`atomic_directory`).
"""

import collections
import contextlib
import errno
import hashlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch

from llama import weights
from llama.config import ModelArgs, trained_context

# Bytes of tensors read through one memory mapping of a file before it is let go: the pages read stay resident
# while it is mapped, so this bounds the host memory loading needs beyond what a rank keeps.
READ_CHUNK_BYTES = 1 << 28


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


class ReadJob(NamedTuple):
    """Rows of one piece that a rank keeps: read `length` of them from `start` on `dim` of the piece (dim None: all
    of it), and write them to `target_length` rows from `target_start` on `target_dim` of the rank's tensor."""

    key: str
    piece: Piece
    dim: Optional[int]
    start: int
    length: int
    target_dim: Optional[int]
    target_start: int
    target_length: int

    @property
    def nbytes(self) -> int:
        """Bytes it reads."""
        nbytes = math.prod(self.piece.shape) * self.piece.dtype.itemsize
        return nbytes if self.dim is None else nbytes // self.piece.shape[self.dim] * self.length


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

    scheme: Optional[dict] = None  # a pre-quantized checkpoint's quantization ({"mode": ..., "group_size": ...})

    @property
    def trained_context(self) -> int:
        """The context length the model was trained on: longer ones work, but its text degrades past it."""
        return trained_context(self.params)

    def split_dim(self, key: str) -> Optional[int]:
        """The dim of the full tensor `key` that model-parallel ranks split (None: each holds all of it)."""
        return weights.split_dim(key)

    def stacked_dim(self, key: str) -> Optional[int]:
        """The dim along which the files' pieces of `key` make up the full tensor: the split dim, except where the
        files were split another way (Meta's Llama 3 embedding, split on the vocabulary)."""
        return self.split_dim(key)

    def check_split(self, args: ModelArgs, world: int) -> None:
        """Raise if the tensors cannot be split for `world` processes (beyond what the heads allow); Meta's and
        Hugging Face's can always be."""

    def expected_shapes(self, args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
        """The full shape of every tensor the files must hold for a model of `args`."""
        return weights.full_shapes(args)

    def full_shape(self, key: str) -> Tuple[int, ...]:
        pieces, dim = self.pieces[key], self.stacked_dim(key)
        shape = list(pieces[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in pieces)
        return tuple(shape)

    def nbytes(self, keys: Optional[Iterable[str]] = None) -> int:
        """Bytes of the full tensors (all, or `keys`) as stored."""
        return sum(math.prod(self.full_shape(k)) * self.pieces[k][0].dtype.itemsize
                   for k in (keys if keys is not None else self.pieces))

    def model_args(self, **overrides) -> ModelArgs:
        """ModelArgs from the config; a vocab_size of -1 (Meta's "from the tokenizer") is read off the embedding."""
        args = ModelArgs.from_params(self.params, **overrides)
        if args.vocab_size == -1 and "tok_embeddings.weight" in self.pieces:
            args.vocab_size = self.full_shape("tok_embeddings.weight")[0]
        return args


def check_shapes(source: Checkpoint, args: ModelArgs) -> None:
    """The checkpoint holds exactly the weights its config describes, each with the full shape it implies."""
    expected = source.expected_shapes(args)
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
    if weights.weight(key).kv_heads and world > args.n_kv_heads:
        head = rank * args.n_kv_heads // world  # this KV head is replicated on world / n_kv_heads ranks
        return head * args.head_dim, (head + 1) * args.head_dim
    if full % world:
        raise ValueError(f"{key} has {full} rows on its split dim, not divisible by {world} processes")
    per_rank = full // world
    return rank * per_rank, (rank + 1) * per_rank


def load_rank_state_dict(
    source: Checkpoint,
    args: ModelArgs,
    rank: int,
    world: int,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    keys: Optional[Iterable[str]] = None,
    views: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
    vocab_split: bool = False,
) -> Dict[str, torch.Tensor]:
    """The tensors (all, or `keys`) model-parallel rank `rank` of `world` keeps, in dtype (None: as stored) on device;
    with vocab_split, the embedding's rows of the vocabulary instead of its features (Meta's Llama 3 shards).

    Files are read one after another, each only for the rows this rank keeps and through mappings let go every
    READ_CHUNK_BYTES, so host memory peaks near what the rank keeps plus one chunk. Where every tensor read through a
    mapping is stored as the rank keeps it (same rows, dtype, layout, on the CPU), they stay views of the mapped file:
    no copy at all, and pages are read when first used. views=False always copies, for callers that convert each
    tensor again and free it (a surviving view would keep its whole mapping resident). progress(bytes done, total)
    is called after each chunk.
    """
    check_shapes(source, args)
    source.check_split(args, world)
    device = torch.device(device)
    jobs = collections.defaultdict(list)  # file -> [ReadJob]
    targets = {}  # key -> (shape this rank keeps, number of pieces it is read from)
    for key in keys if keys is not None else source.pieces:
        pieces, stacked = source.pieces[key], source.stacked_dim(key)
        dim = 0 if vocab_split and key == "tok_embeddings.weight" else source.split_dim(key)
        if dim is None:
            jobs[pieces[0].file].append(ReadJob(key, pieces[0], None, 0, 0, None, 0, 0))
            targets[key] = (pieces[0].shape, 1)
            continue
        shape = list(source.full_shape(key))
        start, stop = rank_rows(key, shape[dim], args, rank, world)
        shape[dim] = stop - start
        if stacked != dim:  # every piece holds some of this rank's rows on dim: its slice [start, stop) of them
            for p in pieces:
                jobs[p.file].append(ReadJob(key, p, dim, start, stop - start, stacked, p.offset, p.shape[stacked]))
            targets[key] = (tuple(shape), len(pieces))
            continue
        overlaps = [(p, max(start, p.offset), min(stop, p.offset + p.shape[dim])) for p in pieces]
        overlaps = [(p, lo, hi) for p, lo, hi in overlaps if lo < hi]
        for p, lo, hi in overlaps:
            jobs[p.file].append(ReadJob(key, p, dim, lo - p.offset, hi - lo, dim, lo - start, hi - lo))
        targets[key] = (tuple(shape), len(overlaps))

    state = {}
    total, done = sum(job.nbytes for file_jobs in jobs.values() for job in file_jobs), 0
    for file in source.files:
        for chunk in _chunks(jobs.get(file, []), READ_CHUNK_BYTES):
            _read_chunk(source, file, chunk, targets, state, dtype, device, views)
            done += sum(job.nbytes for job in chunk)
            if progress is not None:
                progress(done, total)
    return state


def _chunks(jobs: List[ReadJob], max_bytes: int) -> Iterable[List[ReadJob]]:
    """Consecutive runs of jobs whose pieces add up to at most max_bytes (or one piece, if larger)."""
    chunk, size = [], 0
    for job in jobs:
        nbytes = math.prod(job.piece.shape) * job.piece.dtype.itemsize
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(job)
        size += nbytes
    if chunk:
        yield chunk


def _read_chunk(source: Checkpoint, file: str, jobs: List[ReadJob], targets: dict, state: dict, dtype, device,
                views) -> None:
    """Do jobs (see load_rank_state_dict) through one mapping of file, into state."""
    kept_views, copied = [], False
    with source.open(file) as read:
        for key, piece, dim, src_start, length, dst_dim, dst_start, dst_length in jobs:
            src = read(key, piece, dim, src_start, length)
            shape, n_pieces = targets[key]
            target_dtype = dtype or src.dtype
            if views and n_pieces == 1 and src.dtype == target_dtype and src.device == device and src.is_contiguous():
                state[key] = src
                kept_views.append(key)
                continue
            if key not in state:
                state[key] = torch.empty(shape, dtype=target_dtype, device=device)
            (state[key] if dst_dim is None else state[key].narrow(dst_dim, dst_start, dst_length)).copy_(src)
            copied = True
    if copied:  # a view would keep the mapping resident, with the pages read for the copies
        for key in kept_views:
            state[key] = state[key].clone()


def split_state_dict(full: Dict[str, torch.Tensor], args: ModelArgs, world: int) -> List[Dict[str, torch.Tensor]]:
    """Cut a full (unsharded) state dict into the `world` shards Meta's layout gives model-parallel ranks (views)."""
    args.check_model_parallel_size(world)
    shards = []
    for rank in range(world):
        shard = {}
        for key, t in full.items():
            dim = 0 if key == "tok_embeddings.weight" and args.vocab_split_embedding else weights.split_dim(key)
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


def partial_prefix(path: str) -> str:
    """The start of the names of the temporary folders `path` is written in: they name the host and process, so a
    later run can tell a folder left by a killed run from one being written."""
    return f".{os.path.basename(path)}.partial-"


def remove_leftovers(path: str) -> None:
    """Remove the partial folders of `path` that runs killed on this host left (their process is gone), saying so;
    refuse to start while another live process writes `path`; report those of other hosts or older versions."""
    parent, prefix = os.path.dirname(os.path.abspath(path)), partial_prefix(path)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        if not name.startswith(prefix):
            continue
        leftover = os.path.join(parent, name)
        host, _, pid = name[len(prefix):].rpartition("-")[0].rpartition("-")  # {host}-{pid}-{random}
        if host != socket.gethostname() or not pid.isdigit():
            print(f"note: {leftover} looks left by an interrupted write (of another host or an older version); "
                  "remove it if no run is writing it", file=sys.stderr)
        elif process_alive(int(pid)):
            raise FileExistsError(f"process {pid} is writing {path} (in {leftover}); wait for it or stop it")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            print(f"removed {leftover}, left by an interrupted write of {path}", file=sys.stderr)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def check_free_space(parent: str, needed: int, path: str) -> None:
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: writing {path} needs about {needed / 1e9:.2f} GB, "
                      f"and {parent} has {free / 1e9:.2f} GB free")


@contextlib.contextmanager
def interrupts_raise():
    """SIGTERM and SIGHUP (a `kill`, a closed terminal) raise SystemExit in the main thread, as SIGINT raises
    KeyboardInterrupt, so cleanup runs before the process ends."""
    signals = (signal.SIGTERM, signal.SIGHUP) if threading.current_thread() is threading.main_thread() else ()

    def exit_for(signum, frame):
        raise SystemExit(128 + signum)

    saved = {s: signal.signal(s, exit_for) for s in signals}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


LOW_SPACE_BYTES = 1 << 26  # free space below this when a write fails means the disk filled up


@contextlib.contextmanager
def atomic_directory(path: str, expected_bytes: int = 0):
    """Yield a temporary sibling folder that is renamed to `path` when the block completes and removed if it fails
    or the process is interrupted (SIGINT, SIGTERM, SIGHUP), so nothing is ever left at `path` half-written; folders a
    killed run left (SIGKILL, power loss) are removed first. expected_bytes: about what will be written, checked
    against the free space first."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; remove it or choose another destination")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(path)
    check_free_space(parent, int(expected_bytes * 1.02), path)
    with interrupts_raise():
        tmp_dir = tempfile.mkdtemp(prefix=f"{partial_prefix(path)}{socket.gethostname()}-{os.getpid()}-", dir=parent)
        try:
            yield tmp_dir
            os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private
            os.rename(tmp_dir, path)
        except Exception as err:
            full = shutil.disk_usage(parent).free < LOW_SPACE_BYTES
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if full and not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
                raise OSError(errno.ENOSPC, f"No space left on device while writing {path} ({err})") from err
            raise
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
