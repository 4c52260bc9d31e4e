"""Llama.build loads a checkpoint; generate / text_completion / chat_completion run it."""

import contextlib
import os
import time
from typing import List, Optional, Tuple, TypedDict

import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F

from llama import runtime, weights
from llama.chat import UNSAFE_ERROR, Dialog, Message, encode_dialog, has_special_tags, validate_dialog
from llama.engine import CpuDecodeEngine
from llama.formats import open_checkpoint
from llama.formats.base import load_rank_state_dict
from llama.kernels import cpu
from llama.linear import linear_factory, place_weights, prequantized_factory
from llama.model import Transformer, fuse_projection_keys
from llama.tokenizer import Tokenizer


EOS_CHECK_INTERVAL = 16  # decode steps between host reads of "has every row finished?" on accelerators


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of top tokens whose mass reaches p. probs (B, V) -> ids (B,)."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), num_samples=1)
    return sorted_ids.gather(-1, choice).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """log p(targets[:, t] | logits[:, t]) for logits (B, S, V) and targets (B, S); 0 where targets are padding."""
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=pad_id)


@contextlib.contextmanager
def no_fairscale_init():
    """Build fairscale layers without materialising and scattering a full master weight per layer.

    With more than one process fairscale fills every weight from a full-size master copy; we replace the weights
    with the checkpoint's right after, so that work (and the resident memory it touches) is pure waste.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        compile: bool = False,
    ) -> "Llama":
        """Load a Meta checkpoint (any shard count), a Hugging Face Llama directory or a pre-quantized checkpoint
        (`python -m llama.convert quantize`) on this process group; tokenizer_path defaults to ckpt_dir's
        tokenizer.model; device and dtype default to the best available (CUDA bf16/fp16, Apple MPS, else CPU bf16).
        quantize="int8" or "int4" (in groups of group_size, default 128) stores every linear weight-only quantized,
        converting tensor by tensor while loading. compile=True runs each decode step through torch.compile (with CUDA
        graphs on CUDA): the first step of each batch size compiles, which takes tens of seconds."""
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be positive")
        # Check the files before any process group or compute is set up.
        source = open_checkpoint(ckpt_dir)
        scheme = source.scheme
        if scheme is not None:
            asked = (quantize or scheme["mode"], group_size or scheme.get("group_size"))
            if asked != (scheme["mode"], scheme.get("group_size")):
                raise ValueError(
                    f"{ckpt_dir} is pre-quantized as {scheme['mode']} (group_size {scheme.get('group_size')}), but "
                    f"quantize={quantize!r}, group_size={group_size} was asked for: leave them out to use the "
                    "checkpoint's scheme, or load the full-precision checkpoint to quantize differently"
                )
        config_file = source.config_file
        if tokenizer_path is None:
            tokenizer_path = os.path.join(ckpt_dir, "tokenizer.model")
            if not os.path.isfile(tokenizer_path):
                raise FileNotFoundError(
                    f"no tokenizer.model in {ckpt_dir}: pass tokenizer_path (Meta's download puts it in the folder "
                    "above the checkpoint)"
                )
        tokenizer = Tokenizer(tokenizer_path)
        args = source.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:  # neither a vocab_size nor an embedding: loading reports the missing weight
            args.vocab_size = tokenizer.n_words
        if args.vocab_size != tokenizer.n_words:
            from_config = source.params.get("vocab_size", -1) != -1
            said = (f"{config_file} says vocab_size={args.vocab_size}" if from_config
                    else f"embedding has {args.vocab_size} rows")
            raise ValueError(
                f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the checkpoint's {said}: use the "
                "tokenizer.model that came with this checkpoint"
            )

        rt = runtime.setup(model_parallel_size, device, dtype)
        args.check_model_parallel_size(rt.model_parallel_size)
        if rt.device.type == "cpu":
            cpu.register_kernels()  # the model's ops run this CPU's kernels from now on, where they build
        # Every rank seeds alike, so every rank samples the same tokens and the shards stay in step.
        torch.manual_seed(seed)

        rank, world = rt.model_parallel_rank, rt.model_parallel_size
        start = time.perf_counter()
        if scheme is not None:
            # the stored quantized tensors, read to the host; each linear's are taken out as it is built
            state = load_rank_state_dict(source, args, rank, world, views=False)
            quantized = {key: state.pop(key) for key in list(state) if weights.weight(key).linear}
            make_linear = prequantized_factory(quantized, scheme, world, rt.device, rt.dtype)
        else:
            make_linear = linear_factory(rt.device, rt.dtype, world, quantize, group_size or 128)
            # Linears that get repacked or quantized are read to the host first, as copies freed one by one as
            # they are converted on the way to the device; other tensors go straight to their device and dtype.
            converted_later = make_linear is not None
            state = load_rank_state_dict(source, args, rank, world, dtype=None if converted_later else rt.dtype,
                                         device="cpu" if converted_later else rt.device, views=not converted_later)
        fuse_projection_keys(state)  # here rather than in load_state_dict's copy: frees each part once joined
        with no_fairscale_init():
            model = Transformer(args)
        try:
            result = model.load_state_dict(state, strict=scheme is None, assign=True)
        except RuntimeError as err:  # the loaders checked names and shapes; this is a last guard
            raise ValueError(f"checkpoint in {ckpt_dir} does not match its {config_file}: {err}") from err
        if scheme is not None and (result.unexpected_keys or any(weights.module_name(k) not in weights.LINEAR_MODULES
                                                                 for k in result.missing_keys)):
            raise ValueError(
                f"checkpoint in {ckpt_dir} does not match its params.json: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )
        del state
        place_weights(model, rt.device, rt.dtype, make_linear)
        model.setup_caches(max_batch_size, max_seq_len)
        model.eval()
        runtime.print_rank0(f"Loaded in {time.perf_counter() - start:.2f} seconds")
        return Llama(model, tokenizer, compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        # How a decode step runs, chosen once here: compiled, with every row at its own position in a tensor and
        # attention over the whole cache under a mask, so shapes never change and torch.compile captures the step
        # once per batch size (on CUDA "reduce-overhead" replays it as one CUDA graph: one launch per token); else
        # through the CPU decode engine where it takes the model (its KV caches set up); else the model's own forward.
        self.compiled_step = None
        self.engine = None
        if compile:
            cuda = model.tok_embeddings.weight.device.type == "cuda"
            self.compiled_step = torch.compile(model.forward, mode="reduce-overhead" if cuda else None, dynamic=False)
        else:
            self.engine = CpuDecodeEngine.for_model(model)

    def decode(self, tokens: torch.Tensor, start_pos: torch.Tensor, rows: Optional[torch.Tensor],
               cache_len: int) -> torch.Tensor:
        """One decode step, by the way chosen in __init__: tokens (B, 1) at positions start_pos (B,) in cache rows
        `rows` (row b if None) -> fp32 logits (B, 1, vocab_size). Every position is below cache_len, which bounds the
        keys model.forward reads (the engine reads each row's own; the compiled step, the whole cache)."""
        if self.compiled_step is not None:
            return self.compiled_step(tokens, start_pos, rows)
        if self.engine is not None and tokens.shape[0] <= self.engine.max_batch:
            return self.engine(tokens, start_pos, rows)
        return self.model.forward(tokens, start_pos, rows, cache_len)

    def _check_generate_args(self, prompt_tokens, max_gen_len, temperature, top_p) -> None:
        params = self.model.params
        if not prompt_tokens:
            raise ValueError("no prompts given")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}; "
                "build with a larger max_batch_size or pass fewer prompts"
            )
        for i, tokens in enumerate(prompt_tokens):
            if not tokens:
                raise ValueError(f"prompt {i} is empty")
            if len(tokens) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(tokens)} tokens long, longer than max_seq_len={params.max_seq_len}; "
                    "shorten it or build with a larger max_seq_len"
                )
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be at least 1, got {max_gen_len}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt; returns generated ids per prompt (prompt included with echo) cut at the first
        generated EOS, and each token's log-probability when asked (the first prompt token has none: 0.0).

        Every prompt is prefilled whole (padded to the longest), then each row decodes at its own position until
        its EOS or its length, and a finished row leaves the batch (on accelerators at the next EOS check; the
        compiled step keeps its batch, so finished rows repeat their last position there).
        """
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p)
        pad_id, eos_id = self.tokenizer.pad_id, self.tokenizer.eos_id
        device = self.model.tok_embeddings.weight.device
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        ends = [min(self.model.params.max_seq_len, n + max_gen_len) for n in prompt_lens]  # each row's last length
        total_len, prompt_len = max(ends), max(prompt_lens)

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)  # 0 (unk) pads the prefill
        for i, t in enumerate(prompt_tokens):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        all_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
        position = torch.tensor(prompt_lens, device=device)  # each row's next position to fill
        end = torch.tensor(ends, device=device)
        live = position < end  # rows still generating
        last_position = list(prompt_lens)  # a bound on each row's position kept on the host: no device reads

        logits = self.model.forward(tokens[:, :prompt_len], 0)
        if logprobs:
            all_logprobs[:, 1:prompt_len] = token_logprobs(logits[:, :-1], tokens[:, 1:prompt_len], pad_id)
        batch = [i for i in range(bsz) if prompt_lens[i] < ends[i]]
        if self.compiled_step is not None:
            batch = list(range(bsz))  # fixed shapes
        batch_rows = torch.tensor(batch, dtype=torch.long, device=device)
        last = logits[batch_rows, position[batch_rows] - 1]  # (A, V): each row's logits for its next token
        del logits  # (B, prompt_len, V) fp32: not kept through decoding
        step = 0
        while batch and any(last_position[i] < ends[i] for i in batch):
            next_token = sample_next(last, temperature, top_p)
            at = position[batch_rows]
            writing = live[batch_rows]
            slot = at.clamp(max=total_len - 1)  # rows that are done write their last token back
            tokens[batch_rows, slot] = torch.where(writing, next_token, tokens[batch_rows, slot])
            if logprobs:
                new = token_logprobs(last[:, None], next_token[:, None], pad_id)[:, 0]
                all_logprobs[batch_rows, slot] = torch.where(writing, new, all_logprobs[batch_rows, slot])
            position[batch_rows] = at + writing
            live[batch_rows] = writing & (next_token != eos_id) & (position[batch_rows] < end[batch_rows])
            for i in batch:
                last_position[i] = min(last_position[i] + 1, ends[i])
            step += 1
            # Reading `live` waits for the device; on accelerators do it every few steps so decoding never stalls
            # on it (rows that finished meanwhile only rewrite their last position).
            if device.type == "cpu" or step % EOS_CHECK_INTERVAL == 0:
                still = live.tolist()
                if not any(still):
                    break
                if self.compiled_step is None and not all(still[i] for i in batch):
                    batch = [i for i in batch if still[i]]
                    batch_rows = torch.tensor(batch, dtype=torch.long, device=device)
            if not any(last_position[i] < ends[i] for i in batch):
                break
            start = position[batch_rows] - 1  # each row's newest token goes in
            rows = None if batch == list(range(len(batch))) else batch_rows
            cache_len = max(last_position[i] for i in batch)
            last = self.decode(tokens[batch_rows, start][:, None], start, rows, cache_len)[:, -1]

        out_tokens, out_logprobs = [], []
        token_rows = tokens.tolist()
        logprob_rows = all_logprobs.tolist() if logprobs else None
        for i, prompt_len in enumerate(prompt_lens):
            start = 0 if echo else prompt_len
            generated = token_rows[i][prompt_len : ends[i]]
            stop = prompt_len + generated.index(eos_id) if eos_id in generated else ends[i]  # a generated EOS only
            out_tokens.append(token_rows[i][start:stop])
            if logprobs:
                out_logprobs.append(logprob_rows[i][start:stop])
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each prompt string; max_gen_len defaults to max_seq_len - 1."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        generations, generation_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        results = []
        for i, ids in enumerate(generations):
            result: CompletionPrediction = {"generation": self.tokenizer.decode(ids)}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in ids]
                result["logprobs"] = generation_logprobs[i]
            results.append(result)
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Reply to each dialog as the assistant, in the Llama 2 chat format."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, i)
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d in dialogs]
        generations, generation_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        results = []
        for i, (dialog, ids) in enumerate(zip(dialogs, generations)):
            content = UNSAFE_ERROR if has_special_tags(dialog) else self.tokenizer.decode(ids)
            result: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in ids]
                result["logprobs"] = generation_logprobs[i]
            results.append(result)
        return results
