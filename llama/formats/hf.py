"""Hugging Face's Llama format: config.json <-> params.json, tensor names, and the row order of wq and wk.

HF keeps each weight whole (in `model*.safetensors` or `pytorch_model*.bin`, split across files by tensor) under
its own names, and orders the rows of each attention head for rotating halves, (i, i + D/2), where Meta rotates
interleaved pairs (2i, 2i+1). Reading converts names and rows to Meta's view of the full tensors, so the
model-parallel slicing of base.py applies unchanged; writing does the reverse.
"""

import contextlib
import glob
import json
import math
import os
import re
from typing import Dict, List, Optional, Tuple, Union

import torch

from llama import weights
from llama.config import ModelArgs, trained_context
from llama.formats.base import (Checkpoint, Piece, atomic_directory, check_shapes, compact, load_rank_state_dict,
                                load_shard)
from llama.tokenizer import Tokenizer

# Meta key -> HF name; "{}" stands for the layer index.
META_TO_HF = {w.key: w.hf_name for w in weights.WEIGHTS}
HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older exports carry the table
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")

LLAMA_BOS_ID, LLAMA_EOS_ID = 1, 2  # used when no tokenizer.model is at hand
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# (index file, weight files without an index), in the order HF prefers them
WEIGHT_FILES = (("model.safetensors.index.json", "model*.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model*.bin"))


def _rename(name: str, table: Dict[str, str]) -> Optional[str]:
    match = LAYER_INDEX.search(name)
    template = table.get(LAYER_INDEX.sub("layers.{}.", name, count=1) if match else name)
    return template.format(match.group(1)) if template and match else template


def hf_name(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    return _rename(key, META_TO_HF)


def meta_key(name: str) -> Optional[str]:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'; None for a name Llama lacks."""
    return _rename(name, HF_TO_META)


def meta_to_hf_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from Meta's interleaved pairs (2i, 2i+1) to HF's halves (i, i + D/2)."""
    # (heads, D/2, 2, in) -> (heads, 2, D/2, in)
    return w.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2).flatten(0, 2)


def hf_to_meta_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Undo meta_to_hf_rows; w holds whole heads."""
    return w.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


def ffn_params(dim: int, hidden: int) -> Tuple[int, Optional[float]]:
    """multiple_of and ffn_dim_multiplier for which Meta's rule (ModelArgs.ffn_hidden_dim) gives exactly `hidden`:
    the largest power of two that works with no multiplier, else with the shortest decimal multiplier."""
    powers = [m for m in (1 << k for k in range(hidden.bit_length(), -1, -1)) if hidden % m == 0]
    base = int(2 * (4 * dim) / 3)
    for digits in (None, 1, 2, 3, 4, 5, 6):
        multiplier = None if digits is None else round(hidden / base, digits)
        for multiple_of in powers:
            args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            if args.ffn_hidden_dim == hidden:
                return multiple_of, multiplier
    return 1, (hidden + 0.5) / base  # int(multiplier * base) == hidden exactly


# Llama 3.1's rotary scaling: Hugging Face's rope_scaling / rope_parameters keys -> ModelArgs fields
ROPE_SCALING_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                     "high_freq_factor": "rope_high_freq_factor",
                     "original_max_position_embeddings": "rope_old_context_len"}


def config_to_params(config: dict, path: str) -> dict:
    """params.json (Meta's names) for a Hugging Face Llama config.json (transformers 4's rope_scaling or 5's
    rope_parameters); anything Llama 2 and 3 lack is an error. Tied embeddings are the checkpoint's business, not
    params.json's (Meta's files store the output layer either way)."""
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in architectures:
        raise ValueError(
            f"{path} describes model_type={config.get('model_type')!r}, architectures={architectures}: only Llama "
            "(model_type 'llama', LlamaForCausalLM) checkpoints can be loaded"
        )
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers 5 prefers rope_scaling too
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    unsupported = {
        f"rope scaling of type {rope_type!r}": rope_type not in ("default", "llama3"),
        "an activation other than silu": config.get("hidden_act", "silu") != "silu",
        "attention or MLP biases": config.get("attention_bias", False) or config.get("mlp_bias", False),
        "a head_dim other than hidden_size / num_attention_heads": config.get("head_dim") not in (None, dim // n_heads),
    }
    if any(unsupported.values()):
        raise ValueError(f"{path} asks for {', '.join(k for k, v in unsupported.items() if v)}, which Llama 2 and 3 "
                         "lack")
    multiple_of, multiplier = ffn_params(dim, config["intermediate_size"])
    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads, "multiple_of": multiple_of,
              "norm_eps": config.get("rms_norm_eps", 1e-6), "vocab_size": config["vocab_size"]}
    # Optional keys only when they differ from the default, as in Meta's files (its reference code has no rope_theta)
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if n_kv_heads != n_heads:
        params["n_kv_heads"] = n_kv_heads
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope_theta != 10000.0:
        params["rope_theta"] = rope_theta
    if rope_type == "llama3":
        params["use_scaled_rope"] = True
        missing = [k for k in ROPE_SCALING_KEYS if k not in rope]
        if missing:
            raise ValueError(f"{path} asks for rope scaling of type 'llama3' without its {missing}")
        # each constant only where it differs from what Meta's params.json implies (the factor: by the model's shape)
        implied = ModelArgs.from_params(params)
        for hf_key, field in ROPE_SCALING_KEYS.items():
            value = rope[hf_key]
            default = implied.rope_factor if field == "rope_scaling_factor" else getattr(implied, field)
            if value != default:
                params[field] = value
    return params


def params_to_config(args: ModelArgs, dtype: torch.dtype, bos_id: int, eos_id: Union[int, List[int]], context: int,
                     tied: bool = False) -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4 (rope_theta, rope_scaling, torch_dtype) and 5
    (rope_parameters, dtype); tied: the output layer is the embedding (no lm_head.weight in the files)."""
    dtype_name = str(dtype).removeprefix("torch.")
    scaling = {"rope_type": "llama3", "factor": args.rope_factor, "low_freq_factor": args.rope_low_freq_factor,
               "high_freq_factor": args.rope_high_freq_factor,
               "original_max_position_embeddings": args.rope_old_context_len} if args.use_scaled_rope else None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        "rope_theta": args.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta},
        "max_position_embeddings": context, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tied, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _safetensors():
    """The safetensors package, an optional dependency: only Hugging Face's .safetensors files need it."""
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("Hugging Face .safetensors files need the safetensors package: pip install safetensors") from err
    return safetensors


@contextlib.contextmanager
def _safe_open(path: str):
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            yield f
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def weight_files(path: str) -> List[str]:
    """The weight files of an HF directory: those its index lists, else model*.safetensors or pytorch_model*.bin."""
    for index_name, pattern in WEIGHT_FILES:
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
            absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if absent or not files:
                raise FileNotFoundError(f"{index} lists weight files that are missing: {absent or 'none listed'}")
            return [os.path.join(path, f) for f in files]
        files = sorted(glob.glob(os.path.join(glob.escape(path), pattern)))
        if files:
            return files
    raise FileNotFoundError(f"no weights (model*.safetensors or pytorch_model*.bin) beside {path}/config.json")


class HFCheckpoint(Checkpoint):
    """A Hugging Face Llama directory (config.json + safetensors or .bin weights), seen in Meta's layout."""

    config_file = "config.json"

    def __init__(self, path: str):
        self.path = path
        config = _read_json(os.path.join(path, "config.json"))
        self.params = config_to_params(config, os.path.join(path, "config.json"))
        self.max_position_embeddings = config.get("max_position_embeddings")
        self.head_dim = ModelArgs.from_params(self.params).head_dim
        self.files = weight_files(path)
        self.pieces = {}
        for file in self.files:
            for name, shape, dtype in self._tensors(file):
                key = meta_key(name)
                if key is None:
                    if HF_IGNORED.fullmatch(name):
                        continue
                    raise ValueError(f"{file} holds {name}, which a Llama model does not have")
                if key in self.pieces:
                    raise ValueError(f"{name} is in both {self.pieces[key][0].file} and {file}")
                self.pieces[key] = [Piece(file, name, 0, shape, dtype)]
        # Tied (Llama 3.2 1B, 3B): the output layer is the embedding, which Meta's files store twice
        if config.get("tie_word_embeddings", False) and "output.weight" not in self.pieces:
            if "tok_embeddings.weight" in self.pieces:
                self.pieces["output.weight"] = self.pieces["tok_embeddings.weight"]

    @property
    def trained_context(self) -> int:
        return self.max_position_embeddings or trained_context(self.params)

    @staticmethod
    def _tensors(file: str):
        """(name, shape, dtype) of each tensor in file, read from its header."""
        if file.endswith(".safetensors"):
            with _safe_open(file) as f:
                for name in f.keys():
                    tensor = f.get_slice(name)
                    if tensor.get_dtype() not in SAFETENSORS_DTYPES:
                        raise ValueError(f"{file}: {name} has dtype {tensor.get_dtype()}, not a float type")
                    yield name, tuple(tensor.get_shape()), SAFETENSORS_DTYPES[tensor.get_dtype()]
        else:
            for name, t in load_shard(file).items():
                yield name, tuple(t.shape), t.dtype

    def name_in_files(self, key: str) -> str:
        return hf_name(key) or key

    def _to_meta(self, key: str, t: torch.Tensor) -> torch.Tensor:
        return hf_to_meta_rows(t, self.head_dim) if weights.weight(key).rotated else t

    @contextlib.contextmanager
    def open(self, file: str):
        if file.endswith(".safetensors"):
            with _safe_open(file) as f:
                def read(key, piece, dim, start, length):
                    rows = slice(start, start + length)
                    index = slice(None) if dim is None else (rows if dim == 0 else (slice(None), rows))
                    return self._to_meta(key, f.get_slice(piece.name)[index])

                yield read
        else:
            state = load_shard(file)
            yield lambda key, piece, dim, start, length: self._to_meta(
                key, state[piece.name] if dim is None else state[piece.name].narrow(dim, start, length)
            )


def find_tokenizer(ckpt_dir: str) -> Optional[str]:
    """tokenizer.model in ckpt_dir, else beside it (where Meta's download puts it), else None."""
    for folder in (ckpt_dir, os.path.dirname(os.path.abspath(ckpt_dir))):
        path = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(path):
            return path
    return None


def to_hf_state_dict(state: Dict[str, torch.Tensor], head_dim: int) -> Dict[str, torch.Tensor]:
    """Meta-layout tensors under HF's names, with wq and wk rows in HF's order."""
    return {hf_name(key): meta_to_hf_rows(t, head_dim) if weights.weight(key).rotated else t
            for key, t in state.items()}


def embedding_is_output(source: Checkpoint, args: ModelArgs) -> bool:
    """Whether the output layer is bit for bit the embedding (tied, as in Llama 3.2 1B and 3B): compared on the
    first row before the whole, so that an untied model costs one row's read."""
    keys = ["tok_embeddings.weight", "output.weight"]
    if len({(source.full_shape(k), source.pieces[k][0].dtype) for k in keys}) > 1:
        return False
    first_rows = [load_rank_state_dict(source, args, 0, args.vocab_size, keys=[k], vocab_split=True)[k] for k in keys]
    if not torch.equal(*first_rows):
        return False
    embedding, output = (load_rank_state_dict(source, args, 0, 1, keys=[k])[k] for k in keys)
    return torch.equal(embedding, output)


def save_hf(source: Checkpoint, dst: str, tokenizer_path: Optional[str] = None,
            max_shard_bytes: int = 5 * 10**9) -> None:
    """Write `source` as an HF directory (config.json, safetensors of at most max_shard_bytes each, their index,
    tokenizer.model), atomically. Tensors keep their dtype; one output file's tensors are in memory at a time."""
    if source.scheme is not None:
        raise ValueError(f"{source.path} is a pre-quantized checkpoint, which Hugging Face's format cannot hold; "
                         "convert the full-precision checkpoint it was made from instead")
    save_file = _safetensors().torch.save_file

    args = source.model_args()
    check_shapes(source, args)
    tied = embedding_is_output(source, args)
    keys = [key for key in weights.full_shapes(args) if not (tied and key == "output.weight")]
    dtype = source.pieces[keys[0]][0].dtype
    groups, size = [[]], 0
    for key in keys:
        nbytes = math.prod(source.full_shape(key)) * source.pieces[key][0].dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else None
    eos = (tokenizer.stop_ids if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id) if tokenizer else LLAMA_EOS_ID
    config = params_to_config(args, dtype, tokenizer.bos_id if tokenizer else LLAMA_BOS_ID, eos,
                              source.trained_context, tied)
    with atomic_directory(dst, source.nbytes(keys)) as tmp_dir:
        weight_map, total = {}, 0
        for file, group in zip(files, groups):
            state = load_rank_state_dict(source, args, rank=0, world=1, keys=group)
            tensors = {name: compact(t) for name, t in to_hf_state_dict(state, args.head_dim).items()}
            save_file(tensors, os.path.join(tmp_dir, file), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp_dir, file), 0o644)  # safetensors makes it private
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.nbytes for t in tensors.values())
            del state, tensors
        if len(files) > 1:
            with open(os.path.join(tmp_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f, indent=2)
        if tokenizer_path:
            with open(tokenizer_path, "rb") as src, open(os.path.join(tmp_dir, "tokenizer.model"), "wb") as out:
                out.write(src.read())


def meta_to_hf_model(source: Checkpoint, dtype: Optional[torch.dtype] = None, device: str = "cpu"):
    """transformers' LlamaForCausalLM holding a full-precision checkpoint's weights (any format), built in memory; for
    comparisons and benchmarks."""
    import transformers

    args = source.model_args()
    state = to_hf_state_dict(load_rank_state_dict(source, args, 0, 1, dtype), args.head_dim)
    config = transformers.LlamaConfig(**{
        k: v for k, v in params_to_config(args, next(iter(state.values())).dtype, LLAMA_BOS_ID, LLAMA_EOS_ID,
                                      source.trained_context).items()
        if k not in ("architectures", "model_type", "torch_dtype", "rope_theta", "rope_scaling")  # 5's names only
    })
    model = transformers.LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state)
    return model.to(device).eval()  # device_map would need accelerate
