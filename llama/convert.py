"""Reshard Meta checkpoints for any process count and convert to and from Hugging Face's format; no process group.

    python -m llama.convert reshard SRC DST --model_parallel_size M    # Meta shards for M processes
    python -m llama.convert to_hf SRC DST                              # an HF directory (safetensors)
    python -m llama.convert from_hf SRC DST [--model_parallel_size M]  # Meta shards (default 1)
    python -m llama.convert quantize SRC DST --mode int8|int4 [--group_size 128]  # pre-quantized Meta shards

SRC may be in any format (told apart by params.json, quantization.json or config.json); `reshard` keeps a
pre-quantized checkpoint quantized. DST must not exist: the output is written
to a hidden sibling folder and renamed to DST once complete; an interrupted run (Ctrl-C, SIGTERM, SIGHUP) removes
it, and the next run removes one that a killed run left. One output shard or file is in memory at a time.
"""

import math
from typing import Optional

from llama import weights
from llama.cli import run
from llama.formats import open_checkpoint
from llama.formats.base import load_rank_state_dict
from llama.formats.hf import HFCheckpoint, find_tokenizer, save_hf
from llama.formats.meta import save_checkpoint
from llama.formats.quantized import QUANTIZATION_FILE, full_row_scales, quantize_state_dict
from llama.quantize import QUANTIZE_MODES, check_int4_group_size


def reshard(src: str, dst: str, model_parallel_size: int) -> None:
    """Write SRC as Meta's consolidated.NN.pth shards for model_parallel_size processes, with params.json, a fresh
    checklist.chk and tokenizer.model (found in or beside SRC)."""
    source = open_checkpoint(src)
    args = source.model_args()
    args.check_model_parallel_size(model_parallel_size)
    freqs = args.rotary_frequencies()  # the rope.freqs entry of Meta's files
    shards = ({**load_rank_state_dict(source, args, rank, model_parallel_size,
                                      vocab_split=args.vocab_split_embedding), "rope.freqs": freqs}
              for rank in range(model_parallel_size))
    extra = {QUANTIZATION_FILE: source.scheme} if source.scheme is not None else None  # pre-quantized stays so
    save_checkpoint(dst, source.params, shards, find_tokenizer(src), extra_json=extra, expected_bytes=source.nbytes())
    print(f"wrote {dst}: {model_parallel_size} shard(s) for {model_parallel_size} process(es)")


def from_hf(src: str, dst: str, model_parallel_size: int = 1) -> None:
    """Write a Hugging Face Llama directory SRC as a Meta checkpoint for model_parallel_size processes."""
    reshard(src, dst, model_parallel_size)


def to_hf(src: str, dst: str, tokenizer_path: Optional[str] = None, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write SRC as a Hugging Face directory that transformers' from_pretrained loads, in SRC's dtype;
    tokenizer_path defaults to the tokenizer.model in or beside SRC."""
    save_hf(open_checkpoint(src), dst, tokenizer_path or find_tokenizer(src), max_shard_bytes)
    print(f"wrote {dst}")


def quantize(src: str, dst: str, mode: str, group_size: int = 128) -> None:
    """Write SRC with every linear weight-only quantized (int8 per output channel, or int4 in groups of group_size),
    sharded like SRC, with the scheme in quantization.json: smaller on disk and faster to load."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(QUANTIZE_MODES)}")
    if mode == "int4":
        check_int4_group_size(group_size)
    source = open_checkpoint(src)
    if source.scheme is not None:
        raise ValueError(f"{src} is already quantized ({source.scheme['mode']}); quantize the full-precision "
                         "checkpoint it was made from instead")
    args = source.model_args()
    n_shards = 1 if isinstance(source, HFCheckpoint) else len(source.files)
    scheme = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    freqs = args.rotary_frequencies()  # the rope.freqs entry of Meta's files
    row_scales = full_row_scales(source, args) if mode == "int8" and n_shards > 1 else None
    shards = ({**quantize_state_dict(load_rank_state_dict(source, args, rank, n_shards,
                                                          vocab_split=args.vocab_split_embedding), scheme, row_scales),
               "rope.freqs": freqs} for rank in range(n_shards))
    linear = [key for key in source.pieces if weights.weight(key).linear]
    quantized_bytes = sum(math.prod(source.full_shape(k)) for k in linear) // (1 if mode == "int8" else 2)
    save_checkpoint(dst, source.params, shards, find_tokenizer(src), extra_json={QUANTIZATION_FILE: scheme},
                    expected_bytes=source.nbytes(set(source.pieces) - set(linear)) + quantized_bytes)
    print(f"wrote {dst}: {mode} in {n_shards} shard(s)")


if __name__ == "__main__":
    run({"reshard": reshard, "to_hf": to_hf, "from_hf": from_hf, "quantize": quantize}, "python -m llama.convert")
