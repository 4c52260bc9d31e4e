"""Weight-only quantization schemes: int8 per output channel and int4 in groups along the input features, the math
that makes them, which devices have kernels for them, and the checks on their arguments."""

from typing import Optional, Tuple

import torch


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Each row's int8 step: its largest |weight| / 127, fp32 (N,)."""
    w = weight.float()
    return torch.maximum(w.amax(dim=1), -w.amin(dim=1)).clamp(min=1e-8) / 127


def quantize_int8(weight: torch.Tensor, scales: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (N, K) ~= q (N, K) int8 * scales (N,) fp32. `scales` may be given
    from longer rows than weight holds (the full rows of a rank's slice of a row-parallel layer)."""
    w = weight.to(torch.float32, copy=True)  # the one full-size temporary: the steps below work in place on it
    scales = int8_scales(w) if scales is None else scales
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


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K / 2) uint8, the even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1).to(torch.int32)


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
