"""The one place that decides device, dtype and process groups.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) every process joins the launcher's group; a plain
`python script.py` gets a one-process group of its own, so the same code runs either way.
"""

import atexit
import os
from dataclasses import dataclass
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

from llama.config import DTYPES


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    model_parallel_size: int
    model_parallel_rank: int


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
) -> Runtime:
    """Join (or create) the process group and fairscale's model-parallel groups; choose device and dtype."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)  # torchrun's env:// rendezvous
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
        fs_init.initialize_model_parallel(model_parallel_size)
    elif fs_init.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"model parallelism is already set up with size {fs_init.get_model_parallel_world_size()}, "
            f"not {model_parallel_size}"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Runtime(
        device=device,
        dtype=resolve_dtype(device, dtype),
        rank=dist.get_rank(),
        world_size=world_size,
        model_parallel_size=model_parallel_size,
        model_parallel_rank=fs_init.get_model_parallel_rank(),
    )


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print_rank0(*args, **kwargs) -> None:
    """print on rank 0 only, so N processes do not print N copies."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)
