"""What a model is: `ModelArgs`, the sizes `params.json` describes, and the rules Meta's code derives from them."""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

# The dtypes a model may be held in, by the names the command-line tools take.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def trained_context(params: dict) -> int:
    """The context length a Meta checkpoint was trained on, which params.json does not say: Code Llama's
    (rope_theta 1e6) 16384, Llama 2's 4096."""
    return 16384 if params.get("rope_theta") == 1e6 else 4096


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

    def rotary_frequencies(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The rotary embedding's frequencies theta^(-2i / head_dim) for i < head_dim / 2, fp32 (Meta's rope.freqs)."""
        return 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
