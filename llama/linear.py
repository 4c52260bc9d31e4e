"""Inference-only replacements for fairscale's parallel linears: same math and collectives, weights stored in the
format the fastest available kernel wants. Swapped in while weights are placed (see `place_weights`), so the
model file, the checkpoint format and the loading code stay the same whatever the kernel.
"""

import ctypes
import functools
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama.kernels import cpu
from llama.quantize import (check_int4_group_size, check_int4_layer, check_quantize_mode, pack_nibbles,
                            quantize_int4, quantize_int8, unpack_nibbles)
from llama.weights import FUSED_PROJECTIONS


class ParallelLinear(nn.Module):
    """y = x W^T for this rank's slice of W, then the layer's collective: all-reduce for row-parallel layers,
    all-gather for a column-parallel layer that gathers its output; none at all on one process."""

    def __init__(self, layer: nn.Module, world_size: int):
        super().__init__()
        self.out_features, self.in_features = layer.weight.shape
        if world_size == 1:
            self.collective = None
        elif isinstance(layer, RowParallelLinear):
            self.collective = reduce_from_model_parallel_region
        elif layer.gather_output:
            self.collective = gather_from_model_parallel_region
        else:
            self.collective = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.collective is None else self.collective(y)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and PyTorch may use it (no
    ATEN_CPU_CAPABILITY below AVX-512); elsewhere oneDNN emulates it, and large bf16 matmuls run several times slower
    than fp32 ones."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Scratch:
    """One buffer shared by all linears of a model for weights upcast a block at a time (a fresh allocation per call
    costs more in page faults than the conversion itself)."""

    # Elements per block: 64 MiB of fp32, so the scratch stays small next to the weights whatever the layer.
    BLOCK_NUMEL = 1 << 24

    def __init__(self):
        self.buffer = torch.empty(0)

    def get(self, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        numel = shape[0] * shape[1]
        if self.buffer.dtype != dtype or self.buffer.numel() < numel:
            self.buffer = torch.empty(max(numel, self.buffer.numel()), dtype=dtype)
        return self.buffer[:numel].view(shape)


class CpuLinear(ParallelLinear):
    """A CPU linear whose weight stays a plain tensor: bf16 (N, K); int8 (N, K) with per-row scales; or int4 codes
    (N, K / 2) in the kernel's order (`cpu.pack_int4`) with a scale and a zero per int4_group weights.

    Its matmuls run the kernels of kernels/cpu.cpp: a decode step's rows (up to cpu.DECODE_ROWS) read each weight
    once, at memory bandwidth; a prompt's rows go through in tiles over panels of weights held in cache. Past
    KERNEL_ROWS rows PyTorch's GEMM runs instead, on the weight widened a block of rows at a time into the shared
    scratch: to fp32 on CPUs without native bf16 math (where oneDNN's emulated bf16 is several times slower than
    sgemm), else to the activations' dtype. (Past a few dozen rows its GEMM outruns our tiles by more than it costs
    to widen or dequantize each weight once per call.)
    """

    def __init__(self, layer: nn.Module, world_size: int, weight: torch.Tensor, scales: Optional[torch.Tensor],
                 scratch: Scratch, int4_group: int = 0):
        """weight: (N, K) bf16; or int8 with scales (N,) in the model dtype; or, with int4_group, packed int4 codes
        (N, K / 2) with scales (N, K / int4_group, 2) of (scale, zero) in the model dtype."""
        super().__init__(layer, world_size)
        self.register_buffer("weight", weight.contiguous())  # the kernel walks rows of K elements
        self.register_buffer("scales", scales)
        self.int4_group = int4_group
        self.scratch = scratch
        self.native_bf16 = cpu_has_native_bf16()

    def widened(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows first..last-1 as dtype, dequantized."""
        rows = self.weight[first:last]
        if self.scales is None and rows.dtype == dtype:
            return rows
        if self.int4_group:  # (code - 8) * scale + zero, group by group
            out = self.scratch.get((rows.shape[0], self.in_features), dtype).copy_(cpu.unpack_int4(rows))
            scales, zeros = self.scales[first:last].unsqueeze(-1).unbind(-2)  # (rows, K / G, 1) each
            out.view(rows.shape[0], -1, self.int4_group).sub_(8).mul_(scales).add_(zeros)
            return out
        out = self.scratch.get(rows.shape, dtype).copy_(rows)
        return out if self.scales is None else out.mul_(self.scales[first:last, None])

    # The most rows of x our kernels take, by (weights quantized, CPU with native bf16 math); past them PyTorch's GEMM
    # on the widened weight is faster (where the two cross, per build: docs/performance.md). With native bf16 math
    # that GEMM runs in bf16; int8 and int4 weights are dequantized for it on every call, so our tiles hold on longer.
    KERNEL_ROWS = {(False, False): 32, (False, True): cpu.DECODE_ROWS, (True, False): 96, (True, True): 32}

    def uses_kernel(self, rows: int) -> bool:
        """Whether a matmul of this many rows of x runs our kernel (else PyTorch's GEMM on a widened weight)."""
        return rows <= self.KERNEL_ROWS[self.scales is not None, self.native_bf16]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x.numel() // x.shape[-1]):
            return torch.ops.llama.cpu_matmul(x, self.weight, self.scales, self.int4_group)
        dtype = x.dtype if self.native_bf16 else torch.float32
        xw = x.to(dtype)
        step = max(1, Scratch.BLOCK_NUMEL // self.in_features)
        blocks = [F.linear(xw, self.widened(i, i + step, dtype)) for i in range(0, self.out_features, step)]
        return torch.cat(blocks, dim=-1).to(x.dtype)


class Int8Linear(ParallelLinear):
    """Weight-only int8: half the bytes of bf16 per weight, so decoding reads half as much. Activations stay in
    the model dtype; PyTorch's MPS (and CPU) kernel dequantizes inside the matmul. On the CPU, `int8_linear` picks
    CpuLinear instead wherever the CPU kernels build."""

    def __init__(self, layer: nn.Module, world_size: int, q: torch.Tensor, scales: torch.Tensor):
        """q: (N, K) int8 and scales: (N,) in the model dtype, on the device."""
        super().__init__(layer, world_size)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in ("cpu", "mps"):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        # CUDA has no weight-only int8 kernel: dequantize on the fly (torch.compile fuses this into the matmul)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


def int8_linear(layer: nn.Module, world_size: int, q: torch.Tensor, scales: torch.Tensor,
                scratch: Scratch) -> ParallelLinear:
    """The int8 linear for q's device: our streaming kernel on the CPU where it builds, else PyTorch's kernels."""
    if q.device.type == "cpu" and cpu.available():
        # Huge pages speed up int8 decoding (see docs/performance.md; bf16 weights gained nothing). q is always a
        # fresh tensor (quantized here, or joined from a file's parts), so moving it costs no memory.
        return CpuLinear(layer, world_size, cpu.huge_page_copy(q), scales, scratch)
    return Int8Linear(layer, world_size, q, scales)


def int4_linear(layer: nn.Module, world_size: int, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                scratch: Scratch) -> ParallelLinear:
    """The int4 linear for q's device: our streaming kernel on the CPU where it builds and takes the layer's shape
    (`cpu.int4_fits`), else PyTorch's kernels."""
    if q.device.type == "cpu" and cpu.int4_fits(q.shape[1], group_size):
        packed = cpu.huge_page_copy(cpu.pack_int4(q))  # fresh, as int8_linear's q
        return CpuLinear(layer, world_size, packed, scales_and_zeros.transpose(0, 1).contiguous(), scratch, group_size)
    return Int4Linear(layer, world_size, q, scales_and_zeros, group_size)


class Int4Linear(ParallelLinear):
    """Weight-only int4 in groups along K with a scale and zero point each: a quarter of bf16's bytes."""

    def __init__(self, layer: nn.Module, world_size: int, q: torch.Tensor, scales_and_zeros: torch.Tensor,
                 group_size: int):
        """q: (N, K) int32 codes in [0, 15] and scales_and_zeros: (K / group_size, N, 2) in the model dtype, on the
        device."""
        super().__init__(layer, world_size)
        # the kernels' packing granularity: K must be a multiple of inner_k_tiles * 16
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
        if q.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        else:  # the CUDA kernel takes two 4-bit codes per byte
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q), inner_k_tiles)
        self.group_size = group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        y = mm(x.reshape(-1, self.in_features), self.weight, self.group_size, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features)


def linear_factory(
    device: torch.device, dtype: torch.dtype, world_size: int, quantize: Optional[str] = None, group_size: int = 128
) -> Optional[Callable[[str, nn.Module], nn.Module]]:
    """What each fairscale linear (its weight still as loaded, on the host) becomes: make(name, layer), or None to
    keep fairscale's layers. Bad modes and group sizes are refused here, before any weight is read."""
    check_quantize_mode(quantize, device, dtype)
    if quantize == "int4":
        check_int4_group_size(group_size)

    scratch = Scratch()

    def weight(layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach().to(device, dtype)

    if quantize == "int8":

        def make_int8(name: str, layer: nn.Module) -> nn.Module:
            q, scales = quantize_int8(weight(layer))
            return int8_linear(layer, world_size, q, scales.to(dtype), scratch)

        return make_int8
    if quantize == "int4":

        def make_int4(name: str, layer: nn.Module) -> nn.Module:
            check_int4_layer(name, layer.weight.shape[1], group_size)
            q, scales_and_zeros = quantize_int4(weight(layer), group_size)
            return int4_linear(layer, world_size, q, scales_and_zeros.to(dtype), group_size, scratch)

        return make_int4
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu.available():
        return lambda name, layer: CpuLinear(layer, world_size, weight(layer), None, scratch)
    return None


def place_weights(model: nn.Module, device: torch.device, dtype: torch.dtype,
                  make_linear: Optional[Callable[[str, nn.Module], nn.Module]]) -> None:
    """Move the model's weights to device in dtype one module at a time, turning each fairscale linear into
    make_linear(name, layer) (which moves what it keeps), so the device never holds the whole model in full
    precision when it is quantized, and the host lets go of each source tensor once it is converted."""
    for name in [name for name, _ in model.named_modules()]:  # names only: a replaced module must be freed at once
        module = model.get_submodule(name)
        if make_linear is not None and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            parent_name, _, child_name = name.rpartition(".")
            replacement = make_linear(name, module)
            del module
            setattr(model.get_submodule(parent_name), child_name, replacement)
            release_freed_host_memory()  # the conversion's temporaries, before the next layer's pile up in the heap
            continue
        for param_name, param in list(module.named_parameters(recurse=False)):
            setattr(module, param_name, nn.Parameter(param.detach().to(device, dtype), requires_grad=False))
    release_freed_host_memory()  # and what converting the other tensors freed


def release_freed_host_memory() -> None:
    """Hand host memory that loading freed back to the OS. glibc keeps freed blocks of up to 32 MiB in its heap, so
    the temporaries of converting weights one by one would stay resident (see docs/performance.md); malloc_trim
    returns them. Does nothing where the C library has no malloc_trim."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl), or no process handle (Windows)
        return
    malloc_trim(0)


def fused_parts(name: str) -> list:
    """The checkpoint's modules a model linear is made of: 'layers.0.attention.wqkv' -> [...wq, ...wk, ...wv]."""
    for fused, parts in FUSED_PROJECTIONS.items():
        if name.endswith("." + fused):
            prefix = name[: -len(fused)]
            return [prefix + part for part in parts]
    return [name]


def prequantized_factory(state: Dict[str, torch.Tensor], scheme: dict, world_size: int, device: torch.device,
                         dtype: torch.dtype) -> Callable[[str, nn.Module], nn.Module]:
    """make(name, layer) building each linear from a rank's pre-quantized tensors (see llama/formats/quantized.py),
    which it takes out of `state` as it goes: int8 weight and scales, or int4 codes and scales and zeros, the
    parts of a fused projection joined."""
    check_quantize_mode(scheme["mode"], device, dtype)
    scratch = Scratch()

    def take(key: str, name: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"the checkpoint has no {key} for {name}: not a complete {scheme['mode']} checkpoint")
        return state.pop(key).to(device)

    def make(name: str, layer: nn.Module) -> nn.Module:
        parts = fused_parts(name)

        def joined(suffix: str, dim: int = 0, decode=lambda t: t) -> torch.Tensor:
            return torch.cat([decode(take(f"{part}.{suffix}", name)) for part in parts], dim)

        if scheme["mode"] == "int8":
            return int8_linear(layer, world_size, joined("weight"), joined("scales").to(dtype), scratch)
        check_int4_layer(name, layer.weight.shape[1], scheme["group_size"])
        q = joined("weight", decode=unpack_nibbles)
        scales_and_zeros = joined("scales_and_zeros", dim=1).to(dtype)  # (K / G, N, 2): outputs on dim 1
        return int4_linear(layer, world_size, q, scales_and_zeros, scheme["group_size"], scratch)

    return make
