"""The Llama 2 Transformer, built from fairscale's model-parallel layers.

State-dict keys and per-shard tensor shapes are exactly those of Meta's checkpoints. Internally, projections of the
same input run as one matmul (wq, wk, wv as `wqkv`; w1, w3 as `w13`), each weight the concatenation of this rank's
slices of its parts; `load_state_dict` and `state_dict` translate to and from Meta's keys. The model knows nothing about
devices or process groups: it takes its sizes from `ModelArgs` and the model-parallel world size from fairscale,
and derives device and dtype from its inputs and weights.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from llama import cpu_kernels


@dataclass
class ModelArgs:
    """What `params.json` describes, plus the cache limits the generator chooses."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1 in Meta's params.json: taken from the tokenizer
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        """Build from a `params.json` dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.json has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{**params, **overrides})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU rule: 2/3 of 4*dim, scaled by ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def valid_model_parallel_sizes(self) -> list:
        """Process counts the heads allow: M divides n_heads and either divides n_kv_heads or is a multiple of it
        (then each KV head is replicated on M / n_kv_heads ranks)."""
        return [
            m
            for m in range(1, self.n_heads + 1)
            if self.n_heads % m == 0 and (self.n_kv_heads % m == 0 or m % self.n_kv_heads == 0)
        ]

    def check_model_parallel_size(self, size: int) -> None:
        if size not in self.valid_model_parallel_sizes():
            raise ValueError(
                f"a model with n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} cannot be split over {size} "
                f"processes; sizes that work: {self.valid_model_parallel_sizes()}"
            )

    def kv_heads_stored(self, model_parallel_size: int) -> int:
        """KV heads held across all ranks: more than n_kv_heads when they are replicated."""
        return max(self.n_kv_heads, model_parallel_size)


# Each fused projection and the Meta modules it is made of, in the order their outputs are concatenated.
FUSED_PROJECTIONS = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}


def fuse_projection_keys(state: dict) -> None:
    """In place: replace each layer's Meta-named projection weights by their concatenation under the fused name,
    dropping each set of parts as soon as it is joined (so a loader holds one extra layer's copy at most)."""
    for fused, parts in FUSED_PROJECTIONS.items():
        first = parts[0] + ".weight"
        for key in [k for k in state if k.endswith(first)]:
            prefix = key[: -len(first)]
            part_keys = [f"{prefix}{part}.weight" for part in parts]
            if all(k in state for k in part_keys):
                state[f"{prefix}{fused}.weight"] = torch.cat([state.pop(k) for k in part_keys])


Position = Union[int, torch.Tensor]  # a step's first position: an int, or a 0-d tensor for a static decode step


def _loaded_later(weight: torch.Tensor) -> torch.Tensor:
    """fairscale init_method that leaves weights uninitialised: they are replaced by the checkpoint's."""
    return weight


def column_parallel(in_features: int, out_features: int) -> ColumnParallelLinear:
    """Linear whose output features are split across ranks; each rank keeps its slice of the output."""
    return ColumnParallelLinear(in_features, out_features, bias=False, gather_output=False, init_method=_loaded_later)


def row_parallel(in_features: int, out_features: int) -> RowParallelLinear:
    """Linear whose input features are split across ranks; partial outputs are summed over ranks."""
    return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True, init_method=_loaded_later)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accumulates in fp32 whatever x's dtype and rounds once (Meta's rounds the normalised x to the model dtype,
        # then multiplies): identical in fp32, within a rounding in bf16, and one call instead of several.
        if cpu_kernels.usable(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex numbers e^(i * position * freq) of shape (seqlen, head_dim // 2), in complex64.

    Computed per forward (a few small ops) rather than kept as a buffer, so no `.to(dtype)` can degrade them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x: (B, S, H, D) by rotation: (S, D/2), in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, S, H, D/2) complex
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2).type_as(x)


def causal_mask(seqlen: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """Boolean (seqlen, start_pos + seqlen) mask: query i (at position start_pos + i) sees keys 0..start_pos + i.

    The offset matters when a prompt is fed in pieces after earlier tokens are already cached.
    """
    query_pos = torch.arange(start_pos, start_pos + seqlen, device=device)
    key_pos = torch.arange(start_pos + seqlen, device=device)
    return key_pos[None, :] <= query_pos[:, None]


def attend_one_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of a decode step's single query position to the cached ones, in fp32: q (B, H, 1, D) against k, v
    (B, H_kv, T, D) -> (B, H, 1, D); `visible` (T,) bool masks out keys, else all T are seen. Query head h uses KV
    head h // (H / H_kv), as grouped-query attention does, by viewing the queries as (B, H_kv, H / H_kv, D), so the
    cache is never repeated. Three small matmuls: several times faster than the fused SDPA kernel for one query."""
    bsz, n_heads, _, head_dim = q.shape
    grouped = q.reshape(bsz, k.shape[1], n_heads // k.shape[1], head_dim).float()
    scores = grouped @ k.float().transpose(-1, -2) * head_dim**-0.5  # (B, H_kv, H / H_kv, T)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.view(bsz, n_heads, 1, head_dim).to(q.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (max_batch_size, n_local_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: Position, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, H, S, D) at positions start_pos.. and return the cached keys and values: up to them for
        an int start_pos, or the whole fixed-size cache for a tensor one (a static step: S is 1)."""
        bsz, _, seqlen, _ = k.shape
        if isinstance(start_pos, torch.Tensor):
            self.k[:bsz].index_copy_(2, start_pos.view(1), k)
            self.v[:bsz].index_copy_(2, start_pos.view(1), v)
            return self.k[:bsz], self.v[:bsz]
        end = start_pos + seqlen
        self.k[:bsz, :, start_pos:end] = k
        self.v[:bsz, :, start_pos:end] = v
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, model_parallel_size: int):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // model_parallel_size
        kv_heads = args.kv_heads_stored(model_parallel_size)
        self.n_local_kv_heads = kv_heads // model_parallel_size
        self.wqkv = column_parallel(args.dim, (args.n_heads + 2 * kv_heads) * self.head_dim)  # wq; wk; wv
        # this rank's output features of wq, wk, wv within wqkv
        kv_features = self.n_local_kv_heads * self.head_dim
        self.split_sizes = (self.n_local_heads * self.head_dim, kv_features, kv_features)
        self.wo = row_parallel(args.n_heads * self.head_dim, args.dim)
        self.cache: Optional[KVCache] = None

    def forward(self, x, start_pos: Position, rotation, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q_features, kv_features, _ = self.split_sizes
        qkv = self.wqkv(x)
        if seqlen == 1 and isinstance(start_pos, int) and self.cache is not None and cpu_kernels.usable(qkv):
            # the rest of this method in one call: dozens of tiny ops cost more in dispatch than in arithmetic
            out = cpu_kernels.decode_attention(qkv, self.cache.k, self.cache.v, rotation, start_pos,
                                               self.n_local_heads, self.n_local_kv_heads)
            return self.wo(out)
        # q and k heads are adjacent in wqkv's output: rotate them in one go
        qk = qkv[..., : q_features + kv_features].view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rotary(qk, rotation).split([self.n_local_heads, self.n_local_kv_heads], dim=2)
        v = qkv[..., q_features + kv_features :].view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, H_kv, start_pos + S, D)
        if seqlen == 1:
            out = attend_one_position(q, k, v, mask)
        else:  # each group of n_local_heads / n_local_kv_heads query heads shares one KV head
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, model_parallel_size: int):
        super().__init__()
        self.w13 = column_parallel(dim, 2 * hidden_dim)  # w1; w3
        self.w2 = row_parallel(hidden_dim, dim)
        self.split_sizes = (hidden_dim // model_parallel_size,) * 2  # this rank's w1, w3 within w13

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.split_sizes, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, model_parallel_size: int):
        super().__init__()
        self.attention = Attention(args, model_parallel_size)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, model_parallel_size)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, rotation, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, rotation, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError("ModelArgs.vocab_size must be set (params.json has -1: take it from the tokenizer)")
        model_parallel_size = fs_init.get_model_parallel_world_size()
        params.check_model_parallel_size(model_parallel_size)
        self.params = params
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=_loaded_later)
        self.layers = nn.ModuleList(TransformerBlock(params, model_parallel_size) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_loaded_later)
        self.register_load_state_dict_pre_hook(lambda module, state, *args: fuse_projection_keys(state))
        self.register_state_dict_post_hook(Transformer._split_projection_keys)

    def _split_projection_keys(self, state: dict, prefix: str, local_metadata) -> None:
        """state_dict hook: each fused weight (and any per-row tensor beside it, such as int8 scales) back into
        its Meta-named parts."""
        for i, layer in enumerate(self.layers):
            for fused, parts in FUSED_PROJECTIONS.items():
                sizes = layer.get_submodule(fused.split(".")[0]).split_sizes
                fused_prefix = f"{prefix}layers.{i}.{fused}."
                for key in [k for k in state if k.startswith(fused_prefix)]:
                    if state[key].dim() and state[key].shape[0] == sum(sizes):
                        name = key[len(fused_prefix):]
                        for part, tensor in zip(parts, state.pop(key).split(sizes)):
                            state[f"{prefix}layers.{i}.{part}.{name}"] = tensor

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate every layer's KV cache on the weights' device and dtype."""
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(
                max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim, weight.dtype, weight.device
            )

    def forward(self, tokens: torch.Tensor, start_pos: Position) -> torch.Tensor:
        """tokens: (B, S) ids at positions start_pos..start_pos+S-1 -> fp32 logits (B, S, vocab_size).

        With start_pos a 0-d integer tensor on the weights' device, a static decode step: S is 1, the token
        attends over the whole fixed-size cache with a mask, and every shape is the same from step to step, so
        torch.compile and CUDA graphs capture the step once and reuse it (no host sync, no recompiling).
        """
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        if isinstance(start_pos, torch.Tensor):
            if seqlen != 1:
                raise ValueError(f"a static decode step (tensor start_pos) takes one position, got {seqlen}")
            positions = start_pos.view(1)
            max_seq_len = self.layers[0].attention.cache.k.shape[2]
            mask = torch.arange(max_seq_len, device=tokens.device) <= start_pos  # (T,) keys written so far
        else:
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
            mask = causal_mask(seqlen, start_pos, tokens.device) if seqlen > 1 else None  # one query sees all
        rotation = rotary_angles(positions, self.params.head_dim, self.params.rope_theta)
        # A decode step on one CPU process runs all blocks in one kernel call, when their weights are the kernels'
        # (see cpu_kernels.decode_layers): the same ops, without the Python around each of them.
        one_call = seqlen == 1 and isinstance(start_pos, int) and cpu_kernels.usable(h)
        fused = cpu_kernels.decode_layers(self.layers, h, start_pos, rotation) if one_call else None
        if fused is not None:
            h = fused
        else:
            for layer in self.layers:
                h = layer(h, start_pos, rotation, mask)
        return self.output(self.norm(h)).float()
