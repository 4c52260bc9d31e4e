"""Inference-only replacements for fairscale's parallel linears: same math and collectives, weights stored in the
format the fastest available kernel wants. Swapped in while weights are placed (see `place_weights`), so the
model file, the checkpoint format and the loading code stay the same whatever the kernel.
"""

import functools
import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama.kernels import cpu
from llama.checkpoint import (QUANTIZATION_FILE, SPLIT_DIM, find_shards, load_shard, module_name,
                              release_freed_host_memory)
from llama.model import FUSED_PROJECTIONS


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
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it, and large
    bf16 matmuls run several times slower than fp32 ones."""
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

    Up to cpu.max_rows() rows of input (a decode step) go through the streaming kernel of kernels/cpu.cpp,
    which reads each weight once at memory bandwidth. More rows (a prompt) are multiplied by PyTorch's GEMM from
    the weight widened a block of rows at a time into the shared scratch: to fp32 on CPUs without native bf16 math
    (where oneDNN's emulated bf16 is several times slower than sgemm), else to the activations' dtype.
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
        self.kernel_rows = cpu.max_rows()
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

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.kernel_rows:
            return torch.ops.llama.cpu_matmul(x, self.weight, self.scales, self.int4_group)
        dtype = x.dtype if self.native_bf16 else torch.float32
        xw = x.to(dtype)
        step = max(1, Scratch.BLOCK_NUMEL // self.in_features)
        blocks = [F.linear(xw, self.widened(i, i + step, dtype)) for i in range(0, self.out_features, step)]
        return torch.cat(blocks, dim=-1).to(x.dtype)


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (N, K) ~= q (N, K) int8 * scales (N,) fp32."""
    w = weight.to(torch.float32, copy=True)  # the one full-size temporary: the steps below work in place on it
    scales = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).clamp(min=1e-8) / 127
    q = w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of group_size along K: weight (N, K) ~= (q - 8) * scale + zero for each group.

    Returns q (N, K) int32 in [0, 15] and scales_and_zeros (K / group_size, N, 2) fp32, the layout PyTorch's
    int4 matmul kernels take.
    """
    n, k = weight.shape
    # the one full-size fp32 temporary, worked on in place (as in quantize_int8)
    groups = weight.to(torch.float32, copy=True).view(n, k // group_size, group_size)
    lo, hi = torch.aminmax(groups, dim=-1, keepdim=True)
    scales = (hi - lo).clamp_(min=1e-8) / 15
    zeros = lo + 8 * scales  # the value that code 8 stands for
    q = groups.sub_(lo).div_(scales).round_().clamp_(0, 15).to(torch.int32).view(n, k)
    scales_and_zeros = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (K / G, N, 2)
    return q, scales_and_zeros


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


QUANTIZE_MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def supported_quantize_modes(device: torch.device, dtype: torch.dtype) -> Tuple[str, ...]:
    """The weight-only modes PyTorch has kernels for on this device and dtype."""
    int4 = (
        (device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))
        or (device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0))
    )
    return ("int8", "int4") if int4 else ("int8",)


def check_int4_group_size(group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def check_int4_layer(name: str, in_features: int, group_size: int) -> None:
    """The layer's input features (on this rank) split into whole groups and whole kernel tiles."""
    if in_features % group_size or in_features % (2 * 16):
        raise ValueError(
            f"int4 group_size={group_size} does not divide {name}'s {in_features} input features on this rank; "
            f"choose a group size that does ({[g for g in INT4_GROUP_SIZES if in_features % g == 0]})"
        )


def check_quantize_mode(quantize: Optional[str], device: torch.device, dtype: torch.dtype) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; valid modes: {', '.join(QUANTIZE_MODES)} (or None)")
    supported = supported_quantize_modes(device, dtype)
    if quantize not in supported:
        hint = " (int4 on CUDA needs bf16 and an Ampere or newer GPU)" if device.type == "cuda" else ""
        raise ValueError(
            f"quantize={quantize!r} has no kernel on {device.type} with {dtype}; this device supports: "
            f"{', '.join(supported)}{hint}"
        )


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


# Pre-quantized checkpoints: Meta's layout (consolidated.NN.pth, params.json) with every linear stored quantized,
# and the scheme in QUANTIZATION_FILE, which Llama.build checks against what is asked for.
LINEAR_MODULES = frozenset(SPLIT_DIM) - {"tok_embeddings"} | {f.rpartition(".")[2] for f in FUSED_PROJECTIONS}


def fused_parts(name: str) -> list:
    """The checkpoint's modules a model linear is made of: 'layers.0.attention.wqkv' -> [...wq, ...wk, ...wv]."""
    for fused, parts in FUSED_PROJECTIONS.items():
        if name.endswith("." + fused):
            prefix = name[: -len(fused)]
            return [prefix + part for part in parts]
    return [name]


def read_quantization(ckpt_dir: str) -> Optional[dict]:
    """The scheme a pre-quantized checkpoint was written with ({"mode": ..., "group_size": ...}), or None."""
    path = os.path.join(ckpt_dir, QUANTIZATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        scheme = json.load(f)
    if scheme.get("mode") not in QUANTIZE_MODES:
        raise ValueError(f"{path} names an unknown quantize mode {scheme.get('mode')!r}; valid: {QUANTIZE_MODES}")
    return scheme


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K / 2) uint8, the even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1).to(torch.int32)


def quantize_state_dict(state: Dict[str, torch.Tensor], scheme: dict) -> Dict[str, torch.Tensor]:
    """A rank's state dict as a pre-quantized checkpoint stores it: each linear's `weight` becomes int8 (N, K) plus
    `scales` (N,), or int4 codes packed two per byte (N, K / 2) plus `scales_and_zeros` (K / group, N, 2), fp32."""
    out = {}
    for key, tensor in state.items():
        if key.count(".") < 1 or module_name(key) not in LINEAR_MODULES:
            out[key] = tensor
            continue
        prefix = key[: -len("weight")]
        if scheme["mode"] == "int8":
            out[key], out[prefix + "scales"] = quantize_int8(tensor)
        else:
            check_int4_layer(key, tensor.shape[1], scheme["group_size"])
            q, out[prefix + "scales_and_zeros"] = quantize_int4(tensor, scheme["group_size"])
            out[key] = pack_nibbles(q)
    return out


def load_prequantized(ckpt_dir: str, scheme: dict, rank: int, world: int, device: torch.device,
                      dtype: torch.dtype) -> Tuple[Dict[str, torch.Tensor], Callable[[str, nn.Module], nn.Module]]:
    """This rank's shard of a pre-quantized checkpoint: (the tensors that are not linears, make_linear building
    each linear from its stored quantized tensors)."""
    files = find_shards(ckpt_dir)
    if len(files) != world:
        raise ValueError(
            f"{ckpt_dir} is pre-quantized for {len(files)} process(es) and cannot be split again for {world}: run "
            f"on {len(files)} process(es), or quantize at load time (quantize=...) from the full-precision checkpoint"
        )
    check_quantize_mode(scheme["mode"], device, dtype)
    stored = dict(load_shard(files[rank]))
    stored.pop("rope.freqs", None)
    linear_keys = {k for k in stored if k.count(".") >= 1 and module_name(k) in LINEAR_MODULES}
    quantized = {k: stored.pop(k) for k in linear_keys}

    def take(key: str, name: str) -> torch.Tensor:
        if key not in quantized:
            raise ValueError(f"{files[rank]} has no {key} for {name}: not a complete {scheme['mode']} checkpoint")
        return quantized.pop(key).to(device)

    scratch = Scratch()

    def make(name: str, layer: nn.Module) -> nn.Module:
        parts = fused_parts(name)

        def joined(suffix: str, dim: int = 0, decode=lambda t: t) -> torch.Tensor:
            return torch.cat([decode(take(f"{part}.{suffix}", name)) for part in parts], dim)

        if scheme["mode"] == "int8":
            return int8_linear(layer, world, joined("weight"), joined("scales").to(dtype), scratch)
        q = joined("weight", decode=unpack_nibbles)
        scales_and_zeros = joined("scales_and_zeros", dim=1).to(dtype)  # (K / G, N, 2): outputs on dim 1
        return int4_linear(layer, world, q, scales_and_zeros, scheme["group_size"], scratch)

    return stored, make
