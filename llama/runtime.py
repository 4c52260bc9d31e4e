"""The one place that decides device, dtype, process groups and CPU threads.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) every process joins the launcher's group; a plain
`python script.py` gets a one-process group of its own, so the same code runs either way.

Collectives wait at most LLAMA_DIST_TIMEOUT seconds (default 300) for the other ranks, so a stuck or dead rank
makes the others fail in minutes rather than after PyTorch's 30; waiting for a person (the chat's next line) uses
`waiting_group()`, which has no such bound.
"""

import atexit
import contextlib
import datetime
import functools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from llama.config import DTYPES


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    model_parallel_size: int
    model_parallel_rank: int
    thread_tuner: Optional["ThreadTuner"]  # None: the thread count is fixed (or not on the CPU)


DEFAULT_TIMEOUT_S = 300
WAITING_TIMEOUT = datetime.timedelta(days=365)


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: $LLAMA_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    value = os.environ.get("LLAMA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ValueError(f"LLAMA_DIST_TIMEOUT={value!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def available_devices() -> list:
    """The device types this torch build can use on this machine."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if torch.backends.mps.is_available() else [])


def check_device(device: Union[None, str, torch.device]) -> torch.device:
    """The device asked for, or the default one, raising ValueError if this torch build or machine lacks it."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: choose cpu, cuda, cuda:N or mps") from err
    available = ", ".join(available_devices())
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device 'cuda' is not available: this torch {torch.__version__} is a build without "
                             f"CUDA (install a CUDA build of torch); available here: {available}")
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' is not available: torch has CUDA but sees no GPU (check the driver and "
                             f"CUDA_VISIBLE_DEVICES); available here: {available}")
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} does not exist: this machine shows {torch.cuda.device_count()} "
                             "GPU(s) (under torchrun, one process per GPU: --nproc_per_node at most that many)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            why = ("this torch build has no MPS support" if not torch.backends.mps.is_built()
                   else "it needs Apple silicon and macOS 12.3 or later")
            raise ValueError(f"device 'mps' is not available: {why}; available here: {available}")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: choose one of {available}")
    return device


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is present, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(device: torch.device, dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """bf16 where the device supports it, fp16 on older GPUs; never fp16 on the CPU (its matmuls crawl there)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.bfloat16
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose bf16, fp16 or fp32")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 on the CPU is extremely slow; use dtype='bf16' or 'fp32'")
    return dtype


def setup(
    model_parallel_size: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    dtype: Union[None, str, torch.dtype] = None,
    threads: Optional[int] = None,
) -> Runtime:
    """Join (or create) the process group and fairscale's model-parallel groups; choose device, dtype and CPU
    threads: `threads` (or $OMP_NUM_THREADS) fixes their count, else it starts at PyTorch's (one per core) and a
    ThreadTuner adapts it while decoding on the CPU."""
    check_threads(threads)
    device = check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=collective_timeout())  # torchrun's env:// rendezvous
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # A group left open at exit can abort the process in gloo's teardown ("terminate called ..."), failing
        # an otherwise finished run: close the group we opened.
        atexit.register(_close_process_group)
    world_size = dist.get_world_size()
    model_parallel_size = model_parallel_size or world_size
    if world_size % model_parallel_size:
        raise ValueError(f"model_parallel_size={model_parallel_size} does not divide the world size {world_size}")
    if not fs_init.model_parallel_is_initialized():
        with groups_timeout(collective_timeout()):
            fs_init.initialize_model_parallel(model_parallel_size)
        if world_size > 1:
            waiting_group()  # made now, by every rank at the same point
    elif fs_init.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"model parallelism is already set up with size {fs_init.get_model_parallel_world_size()}, "
            f"not {model_parallel_size}"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    tune = threads is None and "OMP_NUM_THREADS" not in os.environ and device.type == "cpu"
    return Runtime(
        device=device,
        dtype=resolve_dtype(device, dtype),
        rank=dist.get_rank(),
        world_size=world_size,
        model_parallel_size=model_parallel_size,
        model_parallel_rank=fs_init.get_model_parallel_rank(),
        thread_tuner=ThreadTuner(torch.get_num_threads()) if tune and torch.get_num_threads() > 1 else None,
    )


def check_threads(threads: Optional[int]) -> None:
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")


@contextlib.contextmanager
def groups_timeout(timeout: datetime.timedelta):
    """Give the groups made meanwhile `timeout`: fairscale makes its model-parallel groups with no timeout argument,
    so they would get PyTorch's default of 30 minutes (read from these module globals when a group is made)."""
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


@functools.lru_cache(maxsize=None)
def waiting_group() -> dist.ProcessGroup:
    """A group of every rank for waiting on a person (rank 0 reading the next line) without a time bound."""
    return dist.new_group(timeout=WAITING_TIMEOUT)


def from_rank0(value: Any) -> Any:
    """`value` as rank 0 of this rank's model-parallel group has it (pickled and sent when the group has more than
    one rank)."""
    if not dist.is_initialized() or fs_init.get_model_parallel_world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=fs_init.get_model_parallel_src_rank(),
                               group=fs_init.get_model_parallel_group())
    return shared[0]


class ThreadTuner:
    """The thread count of CPU decode steps, kept at whichever of `counts` runs them fastest right now.

    An OpenMP thread that does not get a core holds up every parallel region it is part of for a scheduler time
    slice, so while another process keeps one of two cores busy, a step on two threads runs several times slower than
    on one. So every `interval` steps a step runs on another count, which is kept if clearly faster (by SWITCH_GAIN:
    contention makes a far larger difference than noise); the interval doubles up to MAX_INTERVAL while the count
    holds (on an idle machine the probes cost about 2% of a 64-token answer and well under 1% of long ones), and
    drops back to MIN_INTERVAL when steps slow down by half, as they do when a competing process starts.
    """

    MIN_INTERVAL, MAX_INTERVAL, PROBE_STEPS, RECENT, SWITCH_GAIN = 16, 256, 1, 4, 0.8

    def __init__(self, threads: int):
        self.counts = sorted({threads, max(1, threads - 1), max(1, threads // 2)}, reverse=True)
        self.current = threads
        self.interval = self.MIN_INTERVAL
        self.until_probe = self.interval
        self.probe = None  # (count, probe steps left, times) while probing
        self.recent = []  # (batch, seconds) of the latest steps on the current count
        self.baseline = None  # a running average of the current count's step time
        self.alternatives = [c for c in self.counts if c != threads]

    @contextlib.contextmanager
    def step(self, batch: int):
        """Time one decode step of `batch` rows, run on the count chosen for it."""
        count = self.choose(batch)
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        start = time.perf_counter()
        yield
        self.record(batch, count, time.perf_counter() - start)

    def choose(self, batch: int) -> int:
        """The thread count for the next step, of `batch` rows."""
        if self.probe is None and self.until_probe <= 0 and len(self.recent) >= 2 and all(
                b == batch for b, _ in self.recent):
            self.probe = (self.alternatives[0], self.PROBE_STEPS, [])
        return self.probe[0] if self.probe is not None else self.current

    def record(self, batch: int, count: int, seconds: float) -> None:
        """Learn from a step of `batch` rows that took `seconds` on `count` threads."""
        if self.probe is not None:
            probe_count, left, times = self.probe
            times.append(seconds)
            if left > 1:
                self.probe = (probe_count, left - 1, times)
                return
            self.probe = None
            self.alternatives.append(self.alternatives.pop(0))  # next time, the next alternative
            # against the current count's median: its steps vary widely when it is the one that competes for a core
            if min(times) < self.SWITCH_GAIN * statistics.median(s for _, s in self.recent):
                self.alternatives[self.alternatives.index(probe_count)] = self.current
                self.current, self.recent, self.baseline = probe_count, [], None
                self.interval = self.MIN_INTERVAL
            else:
                self.interval = min(2 * self.interval, self.MAX_INTERVAL)
            self.until_probe = self.interval
            return
        if self.recent and self.recent[-1][0] != batch:  # a new batch size: times are not comparable
            self.recent, self.baseline = [], None
        self.recent = (self.recent + [(batch, seconds)])[-self.RECENT:]
        if self.baseline is not None and seconds > 1.5 * self.baseline and len(self.counts) > 1:
            self.until_probe = min(self.until_probe, 1)  # slowed down: look again soon
            self.interval = self.MIN_INTERVAL
        self.baseline = seconds if self.baseline is None else 0.9 * self.baseline + 0.1 * seconds
        self.until_probe -= 1


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print_rank0(*args, **kwargs) -> None:
    """print on rank 0 only, so N processes do not print N copies."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)
