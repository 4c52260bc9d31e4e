"""What a model is: `ModelArgs`, the sizes `params.json` describes, and the rules Meta's code derives from them."""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

# The dtypes a model may be held in, by the names the command-line tools take.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


LLAMA3_ROPE_THETA = 500000.0  # every Llama 3.x params.json's rope_theta


def trained_context(params: dict) -> int:
    """The context length a Meta checkpoint was trained on, which params.json does not say: Llama 3.1 and 3.2's
    (use_scaled_rope) 131072, Llama 3's (rope_theta 500000) 8192, Code Llama's (rope_theta 1e6) 16384, Llama 2's
    4096."""
    if params.get("use_scaled_rope"):
        return 131072
    return {LLAMA3_ROPE_THETA: 8192, 1e6: 16384}.get(params.get("rope_theta"), 4096)


# (dim, n_layers) of Llama 3.2 1B and 3B, whose rotary scaling factor is 32, not Meta's reference code's 8 (which
# Meta confirmed is wrong for them: meta-llama/llama-models issues #166, #241); their params.json does not say.
LLAMA32_SMALL_SHAPES = ((2048, 16), (3072, 28))


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
    use_scaled_rope: bool = False  # Llama 3.1 and 3.2: long wavelengths stretched (see rotary_frequencies)
    # Not Meta's keys: the scaling's constants, which Meta's reference code fixes and Hugging Face's configs carry;
    # written to params.json only where a checkpoint differs from them. None: 8, or 32 for Llama 3.2 1B and 3B.
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192  # the context the model was trained on before its context was extended
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
    def rope_factor(self) -> float:
        """How much long wavelengths are stretched under use_scaled_rope: rope_scaling_factor when given, else 32 for
        Llama 3.2 1B and 3B (told by their shapes) and Meta's 8 for the others."""
        if self.rope_scaling_factor is not None:
            return self.rope_scaling_factor
        return 32.0 if (self.dim, self.n_layers) in LLAMA32_SMALL_SHAPES else 8.0

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

    @property
    def vocab_split_embedding(self) -> bool:
        """Whether Meta's shards split the embedding on the vocabulary (Llama 3's VocabParallelEmbedding) rather than
        on the features (Llama 2's ParallelEmbedding). params.json does not say: Llama 3 is told by its rope_theta.
        The model itself always splits on the features; only the files differ."""
        return self.rope_theta == LLAMA3_ROPE_THETA

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
        """The rotary embedding's frequencies theta^(-2i / head_dim) for i < head_dim / 2, fp32 (Meta's rope.freqs);
        under use_scaled_rope, Llama 3.1's rescaling: wavelengths shorter than old_context_len / high_freq_factor are
        kept, those longer than old_context_len / low_freq_factor divided by the factor, and those between blended
        smoothly (the same fp32 operations as Meta's apply_scaling and transformers' "llama3" rope)."""
        freqs = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        if not self.use_scaled_rope:
            return freqs
        factor, low, high, old = (self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                                  self.rope_old_context_len)
        wavelen = 2 * math.pi / freqs
        stretched = torch.where(wavelen > old / low, freqs / factor, freqs)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * stretched / factor + smooth * stretched
        return torch.where((wavelen >= old / high) & (wavelen <= old / low), blended, stretched)
