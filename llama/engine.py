"""The CPU decode engine: a whole decode step of a one-process CPU model, tokens to logits, in one kernel call.

For small models the Python around each op of a step costs as much as the ops, so the step runs in cpu.cpp's
`llama_decode_step`, which computes what `Transformer.forward` computes with the ops' CPU kernels. The engine stands
beside the model: `Llama` makes it once, when the model is built, and it holds each block's tensors in the kernel's
`LayerTensors` structs, the others in a `ModelTensors` and the model's sizes in a `ModelShape`, checked once. It keeps
those very tensors (not copies), so weights changed in place are seen, and they live as long as the engine; new KV
caches (`setup_caches` again) need a new engine, and a step refuses to run on replaced ones. The one thing it
computes for itself is the rotary embedding of every position, once (4 head_dim bytes per position of the caches).
"""

import ctypes
from typing import Optional

import torch

from llama.kernels import cpu
from llama.linear import CpuLinear
from llama.model import Transformer


class CpuDecodeEngine:
    def __init__(self, model: Transformer, layers: list, outside: list, shape: ctypes.Structure):
        """Use `for_model`, which checks that the kernel can take the model."""
        self.model = model
        self.tensors = layers + [outside]  # the tensors the structs point into, kept alive here
        self.layers = (cpu.struct("LayerTensors") * len(layers))(*(
            cpu.struct("LayerTensors")(*(None if t is None else t.data_ptr() for t in tensors)) for tensors in layers))
        self.outside = cpu.struct("ModelTensors")(ctypes.addressof(self.layers),
                                                  *(None if t is None else t.data_ptr() for t in outside))
        self.shape = shape
        self.max_batch = shape.max_batch

    def takes(self, batch: int) -> bool:
        """Whether a step of `batch` sequences should run here: up to max_batch, while the model's linears run our
        kernels at that many rows. Past that their GEMM is faster, and the model's forward runs it."""
        return batch <= self.max_batch and self.model.output.uses_kernel(batch)

    @classmethod
    def for_model(cls, model: Transformer) -> Optional["CpuDecodeEngine"]:
        """The engine for `model` (its KV caches set up), or None when the kernel cannot run it: not on the CPU in
        bf16 or fp32, a linear (the output's too) that is not a one-process `CpuLinear` of the blocks' kind, or tensors
        of other shapes than it assumes."""
        dtype, dim = model.norm.weight.dtype, model.params.dim
        if model.norm.weight.device.type != "cpu" or dtype not in cpu.KERNEL_DTYPES or not cpu.available():
            return None  # (the device first: no C++ build for a GPU model)
        if len(model.layers) == 0 or model.layers[0].attention.cache is None:
            return None
        first = model.layers[0]
        cache_shape = first.attention.cache.k.shape  # (max_batch, H_kv, T_max, D)
        n_heads, hidden = first.attention.n_local_heads, first.feed_forward.split_sizes[0]
        int4_group = getattr(first.attention.wqkv, "int4_group", None)
        heads, kv = n_heads * cache_shape[3], cache_shape[1] * cache_shape[3]
        shapes = {"wqkv": (heads + 2 * kv, dim), "wo": (dim, heads), "w13": (2 * hidden, dim), "w2": (dim, hidden)}
        layers = []
        for layer in model.layers:
            attention, ffn = layer.attention, layer.feed_forward
            linears = {"wqkv": attention.wqkv, "wo": attention.wo, "w13": ffn.w13, "w2": ffn.w2}
            if not all(_fits(linear, shapes[name], dtype, int4_group) for name, linear in linears.items()):
                return None
            norms = (layer.attention_norm, layer.ffn_norm)
            caches = (attention.cache.k, attention.cache.v)
            if (any(n.eps != first.attention_norm.eps or n.weight.shape != (dim,) or n.weight.dtype != dtype
                    or not n.weight.is_contiguous() for n in norms)
                    or any(c.shape != cache_shape or c.dtype != dtype or not c.is_contiguous() for c in caches)):
                return None
            layers.append([layer.attention_norm.weight, attention.wqkv.weight, attention.wqkv.scales,
                           attention.wo.weight, attention.wo.scales, layer.ffn_norm.weight, ffn.w13.weight,
                           ffn.w13.scales, ffn.w2.weight, ffn.w2.scales, *caches])
        vocab_size, embedding, norm = model.params.vocab_size, model.tok_embeddings.weight, model.norm.weight
        if (not _fits(model.output, (vocab_size, dim), dtype, int4_group)
                or embedding.shape != (vocab_size, dim) or embedding.dtype != dtype or not embedding.is_contiguous()
                or model.norm.eps != first.attention_norm.eps or norm.shape != (dim,) or not norm.is_contiguous()):
            return None
        positions = torch.arange(cache_shape[2])[None]
        rotations = model.rotation(positions)[0].contiguous()  # (max_seq_len, head_dim / 2, 2)
        outside = [embedding, rotations, norm, model.output.weight, model.output.scales]
        shape = cpu.struct("ModelShape")(
            vocab_size=vocab_size, n_layers=len(layers), dim=dim, n_heads=n_heads, n_kv_heads=cache_shape[1],
            head_dim=cache_shape[3], hidden=hidden, max_batch=cache_shape[0], max_seq_len=cache_shape[2],
            int4_group=int4_group, eps=first.attention_norm.eps, act_bf16=int(dtype == torch.bfloat16))
        return cls(model, layers, outside, shape)

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A decode step, as `model.forward(tokens, start_pos, rows)` computes it: tokens (B, 1), each row's position
        start_pos (B,) and cache row rows (B,) (row b if None), int64 -> fp32 logits (B, 1, vocab_size)."""
        bsz = tokens.shape[0]
        rows_fit = rows is None or (rows.shape == (bsz,) and rows.dtype == torch.int64)
        if (tokens.shape != (bsz, 1) or tokens.dtype != torch.int64 or not 1 <= bsz <= self.max_batch
                or start_pos.shape != (bsz,) or start_pos.dtype != torch.int64 or not rows_fit):
            raise ValueError(f"the CPU decode engine takes tokens (B, 1) for 1 <= B <= {self.max_batch} with one "
                             f"int64 position (and cache row) per row, got tokens {tuple(tokens.shape)}, positions "
                             f"{tuple(start_pos.shape)} {start_pos.dtype}")
        if self.model.layers[0].attention.cache.k is not self.tensors[0][-2]:
            raise RuntimeError("the model's KV caches were replaced (setup_caches) after its CPU decode engine was "
                               "made: make a new engine (or Llama) for the new caches")
        tokens, start_pos = tokens.contiguous(), start_pos.contiguous()
        rows = rows.contiguous() if rows is not None else None
        logits = torch.empty(bsz, 1, self.shape.vocab_size)
        cpu.check(cpu.library().llama_decode_step(
            ctypes.addressof(self.outside), ctypes.addressof(self.shape), tokens.data_ptr(), start_pos.data_ptr(),
            None if rows is None else rows.data_ptr(), bsz, logits.data_ptr()))
        return logits


def _fits(linear, shape: tuple, dtype: torch.dtype, int4_group: Optional[int]) -> bool:
    """Whether a block's linear is a one-process CpuLinear of the (N, K) shape given, with the dtypes and int4 group
    the kernel assumes for every linear of the model."""
    if not isinstance(linear, CpuLinear) or linear.collective is not None or linear.int4_group != int4_group:
        return False
    n, k = shape
    weight, scales = linear.weight, linear.scales
    if scales is None:
        expected = (torch.bfloat16, (n, k), None, None)
    elif int4_group == 0:
        expected = (torch.int8, (n, k), dtype, (n,))
    else:
        expected = (torch.uint8, (n, k // 2), dtype, (n, k // int4_group, 2))
    found = (weight.dtype, weight.shape) + ((None, None) if scales is None else (scales.dtype, scales.shape))
    return found == expected and weight.is_contiguous() and (scales is None or scales.is_contiguous())
