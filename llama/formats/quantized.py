"""Pre-quantized checkpoints: Meta's layout (consolidated.NN.pth, params.json) with every linear stored quantized
and the scheme in quantization.json. A linear `name` is stored as `name.weight`, int8 (N, K) with `name.scales`
(N,), or int4 codes two to a byte (N, K / 2) with `name.scales_and_zeros` (K / group, N, 2), fp32; written for any
model-parallel size and read for any other, like full-precision shards. So that resharding is exact, int8 scales
are those of whole rows, the same in every shard of a layer split on its input features, and int4 groups never
straddle two shards."""

import json
import os
from typing import Dict, Optional, Tuple

import torch

from llama import weights
from llama.config import ModelArgs
from llama.formats.base import Checkpoint, load_rank_state_dict, load_shard
from llama.formats.meta import MetaCheckpoint
from llama.quantize import QUANTIZE_MODES, check_int4_layer, int8_scales, pack_nibbles, quantize_int4, quantize_int8

QUANTIZATION_FILE = "quantization.json"


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


class QuantizedCheckpoint(MetaCheckpoint):
    """Pre-quantized shards, indexed like Meta's: a linear's scales are split with its output features (int8: kept
    whole when the weight is split on its input features), its int4 scales and zeros with its groups."""

    def __init__(self, ckpt_dir: str):
        self.scheme = read_quantization(ckpt_dir)
        super().__init__(ckpt_dir)
        first, *others = [load_shard(path) for path in self.files]  # memory-mapped: only the scales are read
        for key in [k for k in self.pieces if k.endswith(".scales") and self.split_dim(k) is None]:
            if not all(torch.equal(first[key], shard[key]) for shard in others):
                raise ValueError(f"the shards of {self.path} hold different int8 scales for {key}, so they cannot be "
                                 "joined or split (an older version wrote per-shard scales): quantize the "
                                 "full-precision checkpoint again")

    def split_dim(self, key: str) -> Optional[int]:
        dim = weights.split_dim(key)
        kind = key.rpartition(".")[2]
        if kind == "scales":  # (N,)
            return 0 if dim == 0 else None
        if kind == "scales_and_zeros":  # (K / group, N, 2)
            return None if dim is None else 1 - dim
        return dim

    def check_split(self, args: ModelArgs, world: int) -> None:
        """int4 groups must not straddle two processes' slices of a layer split on its input features."""
        if self.scheme["mode"] != "int4":
            return
        group = self.scheme["group_size"]
        for key, shape in weights.full_shapes(args).items():
            k = shape[-1]
            if weights.weight(key).linear and weights.split_dim(key) == 1 and k % (group * world):
                raise ValueError(
                    f"{self.path} is int4 in groups of {group}: {key}'s {k} input features ({k // group} groups) "
                    f"cannot be split whole among {world} processes; use a process count that divides {k // group}, "
                    "or quantize the full-precision checkpoint with a smaller group_size"
                )

    def expected_shapes(self, args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
        shapes = {}
        for key, shape in weights.full_shapes(args).items():
            if not weights.weight(key).linear:
                shapes[key] = shape
                continue
            (n, k), prefix = shape, key[: -len("weight")]
            if self.scheme["mode"] == "int8":
                shapes.update({key: (n, k), prefix + "scales": (n,)})
            else:
                shapes.update({key: (n, k // 2), prefix + "scales_and_zeros": (k // self.scheme["group_size"], n, 2)})
        return shapes


def full_row_scales(source: Checkpoint, args: ModelArgs) -> Dict[str, torch.Tensor]:
    """int8 scales over the full rows of every linear split on its input features (wo, w2), read one at a time."""
    keys = [k for k in weights.full_shapes(args) if weights.weight(k).linear and weights.split_dim(k) == 1]
    return {key: int8_scales(load_rank_state_dict(source, args, 0, 1, keys=[key])[key]) for key in keys}


def quantize_state_dict(state: Dict[str, torch.Tensor], scheme: dict,
                        row_scales: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """A rank's state dict as a pre-quantized checkpoint stores it: each linear's `weight` becomes int8 (N, K) plus
    `scales` (N,) (from row_scales where given: see full_row_scales), or int4 codes packed two per byte (N, K / 2)
    plus `scales_and_zeros` (K / group, N, 2), fp32."""
    out = {}
    for key, tensor in state.items():
        if weights.weight(key) is None or not weights.weight(key).linear:
            out[key] = tensor
            continue
        prefix = key[: -len("weight")]
        if scheme["mode"] == "int8":
            out[key], out[prefix + "scales"] = quantize_int8(tensor, (row_scales or {}).get(key))
        else:
            check_int4_layer(key, tensor.shape[1], scheme["group_size"])
            q, out[prefix + "scales_and_zeros"] = quantize_int4(tensor, scheme["group_size"])
            out[key] = pack_nibbles(q)
    return out
