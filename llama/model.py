"""The Llama 2 Transformer, built from fairscale's model-parallel layers.

State-dict keys and per-shard tensor shapes are exactly those of Meta's checkpoints. The model knows nothing about
devices or process groups: it takes its sizes from `ModelArgs` and the model-parallel world size from fairscale,
and derives device and dtype from its inputs and weights.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn


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
        # Normalise in fp32 (bf16 has too few mantissa bits for the mean of squares), scale in the model dtype.
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


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


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (max_batch_size, n_local_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, H, S, D) at positions start_pos.., return all cached keys and values up to them."""
        bsz, _, seqlen, _ = k.shape
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
        self.wq = column_parallel(args.dim, args.n_heads * self.head_dim)
        self.wk = column_parallel(args.dim, kv_heads * self.head_dim)
        self.wv = column_parallel(args.dim, kv_heads * self.head_dim)
        self.wo = row_parallel(args.n_heads * self.head_dim, args.dim)
        self.cache: Optional[KVCache] = None

    def forward(self, x, start_pos: int, rotation, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, H_kv, start_pos + S, D)
        # Each group of n_local_heads / n_local_kv_heads query heads shares one KV head.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = column_parallel(dim, hidden_dim)
        self.w2 = row_parallel(hidden_dim, dim)
        self.w3 = column_parallel(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, model_parallel_size: int):
        super().__init__()
        self.attention = Attention(args, model_parallel_size)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
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

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate every layer's KV cache on the weights' device and dtype."""
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(
                max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim, weight.dtype, weight.device
            )

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens: (B, S) ids at positions start_pos..start_pos+S-1 -> fp32 logits (B, S, vocab_size)."""
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        rotation = rotary_angles(positions, self.params.head_dim, self.params.rope_theta)
        # One query token attends to everything cached, so it needs no mask.
        mask = causal_mask(seqlen, start_pos, tokens.device) if seqlen > 1 else None
        for layer in self.layers:
            h = layer(h, start_pos, rotation, mask)
        return self.output(self.norm(h)).float()
