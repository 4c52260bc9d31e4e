"""The model's device-specific computations as torch ops (`torch.ops.llama.*`), each defined by its PyTorch reference
implementation, which runs on every device.

A faster kernel for one device registers for an op once, at build time (`llama.kernels.cpu.register_kernels` for the
CPU), and then the dispatcher runs it for that device's tensors; the model calls each op by one name and never
chooses. The reference functions stay callable on their own, so tests hold every kernel against them.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., K) / sqrt(mean(x^2) + eps) * weight (K,), accumulated in fp32 whatever x's dtype and rounded once.

    (Meta's rounds the normalised x to the model dtype, then multiplies: identical in fp32, within a rounding in bf16.)
    """
    return F.rms_norm(x, x.shape[-1:], weight, eps=eps)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x: (B, S, H, D) by rotation: (B or 1, S, D/2, 2) of (cos, sin),
    in fp32, rounded back to x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, S, H, D/2)
    return torch.view_as_real(pairs * torch.view_as_complex(rotation)[:, :, None, :]).flatten(-2).type_as(x)


def attend_one_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Attention of one query position per row, in fp32: q (B, H, 1, D) against k, v (B, H_kv, T, D) -> (B, H, 1, D);
    `visible` (B, 1, 1, T) bool says which keys each row sees. Query head h uses KV head h // (H / H_kv), as
    grouped-query attention does, by viewing the queries as (B, H_kv, H / H_kv, D), so the cache is never repeated.
    Three small matmuls: several times faster than the fused SDPA kernel for one query."""
    bsz, n_heads, _, head_dim = q.shape
    grouped = q.reshape(bsz, k.shape[1], n_heads // k.shape[1], head_dim).float()
    scores = grouped @ k.float().transpose(-1, -2) * head_dim**-0.5  # (B, H_kv, H / H_kv, T)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.view(bsz, n_heads, 1, head_dim).to(q.dtype)


def attention_reference(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rotation: torch.Tensor,
                        start: torch.Tensor, rows: Optional[torch.Tensor], n_heads: int,
                        cache_len: int) -> torch.Tensor:
    """Attention of a block of new tokens per row over the KV cache, the cache updated in place.

    qkv (B, S, (n_heads + 2 H_kv) D) is wqkv's output: query heads, key heads, value heads. Row b's tokens are at
    positions start[b] .. start[b] + S - 1 and use row rows[b] of the caches (row b when rows is None); the caches
    are (max_batch, H_kv, max_seq_len, D). q and k are rotated by rotation (B, S, D/2, 2), k and v written at their
    positions, and each query attends over its row's keys at positions up to its own, among the first cache_len
    positions (which must exceed every row's last position) -> (B, S, n_heads D).
    """
    bsz, seqlen, _ = qkv.shape
    n_kv_heads, head_dim = cache_k.shape[1], cache_k.shape[3]
    q, k, v = qkv.view(bsz, seqlen, -1, head_dim).split([n_heads, n_kv_heads, n_kv_heads], dim=2)
    q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
    positions = start[:, None] + torch.arange(seqlen, device=start.device)  # (B, S)
    cache_rows = torch.arange(bsz, device=start.device) if rows is None else rows
    cache_k[cache_rows[:, None], :, positions] = k  # (B, S, H_kv, D) into (rows, :, positions)
    cache_v[cache_rows[:, None], :, positions] = v
    keys, values = (c[:bsz, :, :cache_len] if rows is None else c[rows, :, :cache_len] for c in (cache_k, cache_v))
    visible = (torch.arange(cache_len, device=start.device) <= positions[:, :, None])[:, None]  # (B, 1, S, T)
    q = q.transpose(1, 2)  # (B, H, S, D)
    if seqlen == 1:
        out = attend_one_position(q, keys, values, visible)
    else:  # each group of n_heads / H_kv query heads shares one KV head
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=n_kv_heads != n_heads)
    return out.transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)


# The ops' schemas: `Tensor(a!)` marks what an op writes in place. Their reference implementations serve every
# device that has no kernel of its own; torch.compile treats each op as one call.
LIBRARY = torch.library.Library("llama", "DEF")
LIBRARY.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
LIBRARY.define("attention(Tensor qkv, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor rotation, Tensor start, "
               "Tensor? rows, int n_heads, int cache_len) -> Tensor")
LIBRARY.impl("rms_norm", rms_norm_reference, "CompositeExplicitAutograd")
LIBRARY.impl("attention", attention_reference, "CompositeExplicitAutograd")


rms_norm = torch.ops.llama.rms_norm
attention = torch.ops.llama.attention


@torch.library.register_fake("llama::rms_norm", lib=LIBRARY)
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("llama::attention", lib=LIBRARY)
def _(qkv, cache_k, cache_v, rotation, start, rows, n_heads, cache_len):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], n_heads * cache_k.shape[3])
