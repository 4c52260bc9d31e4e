"""What each weight of a Llama checkpoint is, in one table that every loader, converter and writer reads: its name
in Meta's and in Hugging Face's files, its full shape, how model-parallel ranks split it, whether Hugging Face
reorders its rows for rotary embeddings, and which of the model's fused projections it is part of."""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from llama.config import ModelArgs


@dataclass(frozen=True)
class Weight:
    key: str  # Meta's name; "{}" stands for the layer index
    hf_name: str  # Hugging Face's
    shape: Callable[[ModelArgs], Tuple[int, ...]]  # the full (unsharded) shape
    split_dim: Optional[int] = None  # the dim ranks split it on; None: every rank holds all of it (norms)
    rotated: bool = False  # HF orders each head's rows as rotating halves, Meta as interleaved pairs
    kv_heads: bool = False  # rows are KV heads: replicated, not split, on ranks beyond n_kv_heads
    fused: Optional[str] = None  # the model's projection that runs it with its siblings as one matmul

    @property
    def module(self) -> str:
        """'layers.{}.attention.wq.weight' -> 'wq'."""
        return self.key.split(".")[-2]

    @property
    def linear(self) -> bool:
        """A linear layer's weight, which quantization converts (the embedding and norms are not)."""
        return self.module not in ("tok_embeddings", "attention_norm", "ffn_norm", "norm")


def _heads(args: ModelArgs) -> int:
    return args.n_heads * args.head_dim


def _kv(args: ModelArgs) -> int:
    return args.n_kv_heads * args.head_dim


# In Hugging Face's file order, which is also the order tiny.py draws random weights in.
WEIGHTS = (
    Weight("tok_embeddings.weight", "model.embed_tokens.weight", lambda a: (a.vocab_size, a.dim), split_dim=1),
    Weight("layers.{}.attention.wq.weight", "model.layers.{}.self_attn.q_proj.weight",
           lambda a: (_heads(a), a.dim), split_dim=0, rotated=True, fused="attention.wqkv"),
    Weight("layers.{}.attention.wk.weight", "model.layers.{}.self_attn.k_proj.weight",
           lambda a: (_kv(a), a.dim), split_dim=0, rotated=True, kv_heads=True, fused="attention.wqkv"),
    Weight("layers.{}.attention.wv.weight", "model.layers.{}.self_attn.v_proj.weight",
           lambda a: (_kv(a), a.dim), split_dim=0, kv_heads=True, fused="attention.wqkv"),
    Weight("layers.{}.attention.wo.weight", "model.layers.{}.self_attn.o_proj.weight",
           lambda a: (a.dim, _heads(a)), split_dim=1),
    Weight("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight",
           lambda a: (a.ffn_hidden_dim, a.dim), split_dim=0, fused="feed_forward.w13"),
    Weight("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight",
           lambda a: (a.dim, a.ffn_hidden_dim), split_dim=1),
    Weight("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight",
           lambda a: (a.ffn_hidden_dim, a.dim), split_dim=0, fused="feed_forward.w13"),
    Weight("layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight", lambda a: (a.dim,)),
    Weight("layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight", lambda a: (a.dim,)),
    Weight("norm.weight", "model.norm.weight", lambda a: (a.dim,)),
    Weight("output.weight", "lm_head.weight", lambda a: (a.vocab_size, a.dim), split_dim=0),
)
BY_MODULE = {w.module: w for w in WEIGHTS}
LAYER_WEIGHTS = tuple(w for w in WEIGHTS if "{}" in w.key)

# Each fused projection and the Meta modules it is made of, in the order their outputs are concatenated.
FUSED_PROJECTIONS = {
    fused: tuple(w.key.split(".", 2)[2].rpartition(".")[0] for w in WEIGHTS if w.fused == fused)
    for fused in dict.fromkeys(w.fused for w in WEIGHTS if w.fused)
}
LINEAR_MODULES = frozenset(w.module for w in WEIGHTS if w.linear) | {f.rpartition(".")[2] for f in FUSED_PROJECTIONS}


def module_name(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'."""
    return key.split(".")[-2]


def weight(key: str) -> Optional[Weight]:
    """The table's entry for a key of Meta's files ('layers.3.attention.wq.weight'), or None."""
    return BY_MODULE.get(module_name(key)) if "." in key else None


def split_dim(key: str) -> Optional[int]:
    """The dim a tensor is split on across ranks: 'layers.3.attention.wq.weight' -> 0; norms -> None."""
    entry = weight(key)
    return entry.split_dim if entry is not None else None


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every weight's unsharded shape, keyed as in Meta's files, in the table's order (each layer's in turn)."""
    shapes = {}
    for entry in WEIGHTS:
        if "{}" not in entry.key:
            shapes[entry.key] = entry.shape(args)
        elif entry is LAYER_WEIGHTS[0]:
            for i in range(args.n_layers):
                shapes.update({w.key.format(i): w.shape(args) for w in LAYER_WEIGHTS})
    return shapes
