"""The Llama 2 Transformer, built from fairscale's model-parallel layers.

State-dict keys and per-shard tensor shapes are exactly those of Meta's checkpoints. Internally, projections of the
same input run as one matmul (wq, wk, wv as `wqkv`; w1, w3 as `w13`), each weight the concatenation of this rank's
slices of its parts; `load_state_dict` and `state_dict` translate to and from Meta's keys.

The model holds the math once and knows nothing about devices or process groups: it takes its sizes from
`ModelArgs` and the model-parallel world size from fairscale, derives device and dtype from its inputs and weights,
and runs RMSNorm and attention over the KV cache through the ops of llama/ops.py, whatever kernel serves them.
Every row of a batch has its own position and its own row of the KV cache.
"""

import numbers
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from llama import ops
from llama.config import ModelArgs
from llama.weights import FUSED_PROJECTIONS


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


StartPos = Union[int, torch.Tensor]  # one first position for every row, or each row's: a (B,) integer tensor


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
        return ops.rms_norm(x, self.weight, self.eps)


def rotary_angles(positions: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """(cos, sin) of position * frequency for positions (B, S) and frequencies (D/2,) -> (B, S, D/2, 2) in fp32.

    Computed per forward (a few small ops) rather than kept as a buffer, so no `.to(dtype)` can degrade them.
    """
    angles = positions.float()[..., None] * frequencies
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (max_batch_size, n_local_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


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

    def forward(self, x, start, rows, rotation, cache_len: int) -> torch.Tensor:
        out = ops.attention(self.wqkv(x), self.cache.k, self.cache.v, rotation, start, rows, self.n_local_heads,
                            cache_len)
        return self.wo(out)


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

    def forward(self, x, start, rows, rotation, cache_len):
        h = x + self.attention(self.attention_norm(x), start, rows, rotation, cache_len)
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

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary embedding's (cos, sin) for positions (B, S) -> (B, S, head_dim / 2, 2), fp32."""
        return rotary_angles(positions, self.params.rotary_frequencies(positions.device))

    def forward(self, tokens: torch.Tensor, start_pos: StartPos, rows: Optional[torch.Tensor] = None,
                cache_len: Optional[int] = None, logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, S): row b's tokens at positions start_pos[b] .. start_pos[b] + S - 1, kept in row rows[b] of the
        KV caches (row b when rows is None) -> fp32 logits (B, S, vocab_size); with logits_at (B,) indices into S,
        only those tokens' logits (B, 1, vocab_size): a prompt needs its last token's, and the output layer over
        every token would cost a large share of a small model's prefill.

        start_pos is one int for every row (Meta's API) or each row's, a (B,) integer tensor on the weights' device,
        whose values (0 <= start_pos[b], start_pos[b] + S <= max_seq_len) are not read back to be checked.
        Attention reads the first cache_len positions of the caches, which must cover every row's last position: by
        default start_pos + S for an int, and the whole cache for a tensor, so that decode steps keep the same shapes
        (torch.compile and CUDA graphs capture a step once, and no position is read back to the host).
        """
        bsz, seqlen = tokens.shape
        max_seq_len = self.layers[0].attention.cache.k.shape[2]
        if isinstance(start_pos, numbers.Integral):
            cache_len = cache_len or int(start_pos) + seqlen
            if not 0 <= start_pos <= cache_len - seqlen or cache_len > max_seq_len:
                raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} do not fit the cache of "
                                 f"max_seq_len={max_seq_len} (reading {cache_len} positions)")
            start_pos = torch.full((bsz,), int(start_pos), device=tokens.device)
        elif start_pos.dim() == 0:  # one position for every row, as a tensor
            start_pos = start_pos.expand(bsz)
        if start_pos.shape != (bsz,) or (rows is not None and rows.shape != (bsz,)):
            raise ValueError(f"start_pos and rows must give one value per row of tokens {tuple(tokens.shape)}, got "
                             f"{tuple(start_pos.shape)} and {None if rows is None else tuple(rows.shape)}")
        positions = start_pos[:, None] + torch.arange(seqlen, device=tokens.device)
        rotation = self.rotation(positions)
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        for layer in self.layers:
            h = layer(h, start_pos, rows, rotation, cache_len or max_seq_len)
        if logits_at is not None:
            h = h[torch.arange(bsz, device=h.device), logits_at][:, None]  # (B, 1, dim)
        return self.output(self.norm(h)).float()
