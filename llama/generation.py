"""Llama.build loads a checkpoint; generate / text_completion / chat_completion run it."""

import contextlib
import math
import os
import sys
import time
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F

from llama import runtime, weights
from llama.dialog import UNSAFE_ERROR, Dialog, Message, chat_format, has_special_tags, validate_dialog
from llama.engine import CpuDecodeEngine
from llama.formats import open_checkpoint
from llama.formats.base import load_rank_state_dict
from llama.kernels import cpu
from llama.linear import linear_factory, place_weights, prequantized_factory
from llama.model import Transformer, fuse_projection_keys
from llama.streaming import RowText, check_stops
from llama.tokenizer import Tokenizer


EOS_CHECK_INTERVAL = 16  # decode steps between host reads of "has every row finished?" on accelerators


class CompletionPrediction(TypedDict, total=False):
    generation: str
    finish_reason: str  # "stop" (EOS, a stop token or string) or "length" (max_gen_len or the context filled)
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    finish_reason: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class StreamEvent(TypedDict, total=False):
    index: int  # the prompt's
    text: str  # what this step added to its text
    tokens: List[str]  # with logprobs: this step's token
    logprobs: List[float]
    finish_reason: str  # in a prompt's last event only, with the two counts
    prompt_tokens: int
    completion_tokens: int


def as_list(prompts, name: str) -> list:
    """prompts as given, refusing a lone str (which would be completed character by character)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, one per prompt; got {type(prompts).__name__}: wrap a single "
                        "prompt in a list")
    return list(prompts)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of top tokens whose mass reaches p. probs (B, V) -> ids (B,);
    from `generator`, else torch's global one."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), 1, generator=generator)
    return sorted_ids.gather(-1, choice).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """log p(targets[:, t] | logits[:, t]) for logits (B, S, V) and targets (B, S); 0 where targets are padding."""
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=pad_id)


def check_request(prompt_tokens, max_gen_len: int, temperature: float, top_p: float, max_seq_len: int,
                  max_batch_size: int, vocab_size: int, stop_token_ids: Sequence[int] = (),
                  seed: Optional[int] = None) -> None:
    """Raise ValueError or TypeError for a request a model built with max_seq_len, max_batch_size and vocab_size
    cannot run; the command line tools call it before loading anything."""
    if not isinstance(prompt_tokens, (list, tuple)) or not all(isinstance(t, (list, tuple)) for t in prompt_tokens):
        raise TypeError("prompt_tokens must be a list of token-id lists, one per prompt")
    bad = [t for t in stop_token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"stop token ids {bad} are not in the vocabulary (0..{vocab_size - 1})")
    if not prompt_tokens:
        raise ValueError("no prompts given")
    if len(prompt_tokens) > max_batch_size:
        raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size={max_batch_size}; build with a larger "
                         "max_batch_size or pass fewer prompts")
    for i, tokens in enumerate(prompt_tokens):
        if not tokens:
            raise ValueError(f"prompt {i} is empty")
        if len(tokens) > max_seq_len:
            raise ValueError(f"prompt {i} is {len(tokens)} tokens long, longer than max_seq_len={max_seq_len}; "
                             "shorten it or build with a larger max_seq_len")
    check_sampling(max_gen_len, temperature, top_p, seed)


def check_sampling(max_gen_len: int, temperature: float, top_p: float, seed: Optional[int] = None) -> None:
    """Raise ValueError for settings no request can be generated with."""
    if not (isinstance(max_gen_len, int) and max_gen_len >= 1):
        raise ValueError(f"max_gen_len must be an integer of at least 1, got {max_gen_len!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")


class Request(NamedTuple):
    """One call's work. Under model parallelism every rank must compute the same, so each call runs rank 0's
    (`Llama._request`)."""

    prompt_tokens: List[List[int]]
    max_gen_len: int
    temperature: float
    top_p: float
    logprobs: bool
    stops: List[str]  # stop strings
    stop_token_ids: List[int]
    seed: Optional[int]


PROGRESS_MIN_BYTES = 1 << 30  # loads smaller than this are quick: no progress shown


def show_load_progress(done: int, total: int) -> None:
    """Show on rank 0 how much of a large checkpoint has been read, a step every tenth, on one line."""
    if total < PROGRESS_MIN_BYTES:
        return
    tenth = 10 * done // total
    if done == total or tenth > 10 * (done - 1) // total:  # crossed into a new tenth
        runtime.print_rank0(f"\rLoading {total / 1e9:.1f} GB: {10 * tenth}%", end="\n" if done == total else "",
                            file=sys.stderr, flush=True)


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
        threads: Optional[int] = None,
    ) -> "Llama":
        """Load a Meta checkpoint (any shard count), a Hugging Face Llama directory or a pre-quantized checkpoint
        (`python -m llama.convert quantize`) on this process group; tokenizer_path defaults to ckpt_dir's
        tokenizer.model; device and dtype default to the best available (CUDA bf16/fp16, Apple MPS, else CPU bf16).
        quantize="int8" or "int4" (in groups of group_size, default 128) stores every linear weight-only quantized,
        converting tensor by tensor while loading. compile=True runs each decode step through torch.compile (with CUDA
        graphs on CUDA): the first step of each batch size compiles, which takes tens of seconds. threads fixes the
        number of CPU threads (default: one per core, fewer while another process competes for them while decoding;
        $OMP_NUM_THREADS fixes it too)."""
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be positive")
        # Check the arguments and files before any process group or compute is set up.
        runtime.check_device(device)
        runtime.check_threads(threads)
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
                    f"no tokenizer.model in {ckpt_dir}: pass tokenizer_path (Meta's Llama 2 download puts it in the "
                    "folder above the checkpoint; Hugging Face's Llama 3 repositories in original/)"
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

        if max_seq_len > source.trained_context:
            runtime.print_rank0(f"warning: max_seq_len={max_seq_len} is longer than the {source.trained_context} "
                                "tokens this model was trained on; text past that length degrades", file=sys.stderr)

        rt = runtime.setup(model_parallel_size, device, dtype, threads)
        args.check_model_parallel_size(rt.model_parallel_size)
        if rt.device.type == "cpu":
            cpu.register_kernels()  # the model's ops run this CPU's kernels from now on, where they build
        # Every rank seeds alike, so every rank samples the same tokens and the shards stay in step.
        torch.manual_seed(seed)

        rank, world = rt.model_parallel_rank, rt.model_parallel_size
        start = time.perf_counter()
        if scheme is not None:
            # the stored quantized tensors, read to the host; each linear's are taken out as it is built
            state = load_rank_state_dict(source, args, rank, world, views=False, progress=show_load_progress)
            quantized = {key: state.pop(key) for key in list(state) if weights.weight(key).linear}
            make_linear = prequantized_factory(quantized, scheme, world, rt.device, rt.dtype)
        else:
            make_linear = linear_factory(rt.device, rt.dtype, world, quantize, group_size or 128)
            # Linears that get repacked or quantized are read to the host first, as copies freed one by one as
            # they are converted on the way to the device; other tensors go straight to their device and dtype.
            converted_later = make_linear is not None
            state = load_rank_state_dict(source, args, rank, world, dtype=None if converted_later else rt.dtype,
                                         device="cpu" if converted_later else rt.device, views=not converted_later,
                                         progress=show_load_progress)
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
        return Llama(model, tokenizer, compile, rt.thread_tuner)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False,
                 thread_tuner: Optional[runtime.ThreadTuner] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format(tokenizer)  # Llama 2's or Llama 3's, as the tokenizer's kind says
        self.thread_tuner = thread_tuner
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
        with self.thread_tuner.step(tokens.shape[0]) if self.thread_tuner else contextlib.nullcontext():
            if self.engine is not None and self.engine.takes(tokens.shape[0]):
                return self.engine(tokens, start_pos, rows)
            return self.model.forward(tokens, start_pos, rows, cache_len)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt; returns generated ids per prompt (prompt included with echo) cut at the first
        generated stop token of the model's, and each token's log-probability when asked (the first prompt token has
        none: 0.0).
        seed: sample from a generator seeded with it, so the call's result does not depend on earlier calls."""
        request = self._request(prompt_tokens, max_gen_len, temperature, top_p, logprobs, (), (), seed)
        tokens, token_logprobs, _ = self._start(request).run(echo)
        return tokens, (token_logprobs if logprobs else None)

    def _request(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop, stop_token_ids,
                 seed) -> Request:
        """The call's Request as rank 0 of the model-parallel group made it, checked. Every rank must compute the
        same (different prompts on different ranks would make them exchange parts of different sums: wrong text,
        or a hang), so rank 0's request is sent to the others, and every rank computes and returns its results."""
        request = Request(prompt_tokens, max_gen_len, temperature, top_p, logprobs, check_stops(stop),
                          list(stop_token_ids), seed)
        request = runtime.from_rank0(request)
        params = self.model.params
        check_request(request.prompt_tokens, request.max_gen_len, request.temperature, request.top_p,
                      params.max_seq_len, params.max_batch_size, self.tokenizer.n_words, request.stop_token_ids,
                      request.seed)
        return request

    def _start(self, request: Request) -> "Generation":
        return Generation(self, request, [*self.tokenizer.stop_ids, *request.stop_token_ids])

    def stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        stop: Union[None, str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        seed: Optional[int] = None,
    ) -> Iterator[StreamEvent]:
        """Continue each prompt, yielding text as each step makes it: {"index": prompt, "text": piece} (with
        "tokens" and "logprobs" for the step's token when asked), and once per prompt a last event with its
        "finish_reason" ("stop": EOS, a stop token or a stop string; "length": max_gen_len or the context filled)
        and "prompt_tokens" and "completion_tokens" counts (a stop token counts). A prompt's pieces, joined, are
        its whole text: never a partial character, and cut before the first stop string, which is not part of it.
        A row that stops leaves the batch while the others go on. Arguments are checked at once, before the first
        event is asked for."""
        return self._events(self._request(prompt_tokens, max_gen_len, temperature, top_p, logprobs, stop,
                                          stop_token_ids, seed))

    @torch.inference_mode()
    def _events(self, request: Request) -> Iterator[StreamEvent]:
        prompt_tokens = request.prompt_tokens
        generation = self._start(request)
        stop_ids = set(generation.stop_ids)
        texts = [RowText(self.tokenizer, request.stops) for _ in prompt_tokens]
        counts = [0] * len(prompt_tokens)
        finished = [False] * len(prompt_tokens)

        def last_event(row: int, reason: str) -> StreamEvent:
            finished[row] = True
            return {"index": row, "text": texts[row].finish(), "finish_reason": reason,
                    "prompt_tokens": len(prompt_tokens[row]), "completion_tokens": counts[row]}

        for rows, tokens, written, new_logprobs in generation.steps(every_step=True):
            tokens, written = tokens.tolist(), written.tolist()
            new_logprobs = new_logprobs.tolist() if request.logprobs else None
            for j, row in enumerate(rows):
                if not written[j] or finished[row]:
                    continue
                token = tokens[j]
                counts[row] += 1
                piece = "" if token in stop_ids else texts[row].add(token)
                if piece or (request.logprobs and token not in stop_ids):  # logprobs, like text, end before a stop
                    event: StreamEvent = {"index": row, "text": piece}
                    if request.logprobs:
                        event.update(tokens=[self.tokenizer.decode([token])], logprobs=[new_logprobs[j]])
                    yield event
                if token in stop_ids or texts[row].stopped:
                    generation.stop(row)
                    yield last_event(row, "stop")
                elif counts[row] == generation.ends[row] - len(prompt_tokens[row]):
                    yield last_event(row, "length")
        for row in range(len(prompt_tokens)):  # prompts that filled the context: nothing generated
            if not finished[row]:
                yield last_event(row, "length")

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Union[None, str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        seed: Optional[int] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt string; max_gen_len defaults to max_seq_len - 1. Each result says why it ended
        ("finish_reason"); `stop` strings and `stop_token_ids` end a prompt's text early, as in `stream`; `seed` as
        in `generate`."""
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in as_list(prompts, "prompts")]
        return self._complete(self._request(prompt_tokens, self._max_gen_len(max_gen_len), temperature, top_p,
                                            logprobs, stop, stop_token_ids, seed), echo)

    def text_completion_stream(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Union[None, str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        seed: Optional[int] = None,
    ) -> Iterator[StreamEvent]:
        """text_completion as it is written: the events of `stream`, "index" the prompt's."""
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in as_list(prompts, "prompts")]
        return self.stream(prompt_tokens, self._max_gen_len(max_gen_len), temperature, top_p, logprobs, stop,
                           stop_token_ids, seed)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Union[None, str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        seed: Optional[int] = None,
    ) -> List[ChatPrediction]:
        """Reply to each dialog as the assistant, in the model's chat format (Llama 2's or Llama 3's); the model's
        own stop tokens end the reply; "finish_reason", stops and seed as in text_completion."""
        results = self._complete(self._request(self._encode_dialogs(dialogs), self._max_gen_len(max_gen_len),
                                               temperature, top_p, logprobs, stop, stop_token_ids, seed), False)
        for dialog, result in zip(dialogs, results):
            content = UNSAFE_ERROR if has_special_tags(dialog, self.chat_format.special_tags) else result.pop(
                "generation")
            result["generation"] = {"role": "assistant", "content": content}
        return results

    def chat_completion_stream(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Union[None, str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        seed: Optional[int] = None,
    ) -> Iterator[StreamEvent]:
        """chat_completion as it is written: the events of `stream`, "index" the dialog's. A dialog that smuggles
        in the format's tags gets Meta's error reply as its only text."""
        prompt_tokens = self._encode_dialogs(dialogs)  # checks the dialogs
        unsafe = [has_special_tags(d, self.chat_format.special_tags) for d in dialogs]
        events = self.stream(prompt_tokens, self._max_gen_len(max_gen_len), temperature, top_p, logprobs, stop,
                             stop_token_ids, seed)
        return (event if not unsafe[event["index"]] else {**event, "text": UNSAFE_ERROR}
                for event in events if not unsafe[event["index"]] or "finish_reason" in event)

    def _max_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _encode_dialogs(self, dialogs: List[Dialog]) -> List[List[int]]:
        """Prompt ids of each dialog, checked first."""
        if not isinstance(dialogs, (list, tuple)) or (dialogs and isinstance(dialogs[0], dict)):
            raise TypeError("dialogs must be a list of dialogs (each a list of messages): wrap a single dialog in "
                            "a list")
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, i)
        return [self.chat_format.encode(self.tokenizer, d) for d in dialogs]

    def _complete(self, request: Request, echo: bool) -> List[CompletionPrediction]:
        """The completions of a request: {"generation", "finish_reason"} (+ "tokens", "logprobs")."""
        if request.stops:  # text must be read as it is made: the stream's pieces, joined
            if echo:
                raise ValueError("echo=True cannot be combined with stop strings")
            results = [{"generation": "", "tokens": [], "logprobs": []} for _ in request.prompt_tokens]
            for event in self._events(request):
                result = results[event["index"]]
                result["generation"] += event["text"]
                result["tokens"] += event.get("tokens", [])
                result["logprobs"] += event.get("logprobs", [])
                if "finish_reason" in event:
                    result["finish_reason"] = event["finish_reason"]
        else:
            with torch.inference_mode():
                ids, token_logprobs, reasons = self._start(request).run(echo)
            results = [{"generation": self.tokenizer.decode(row), "finish_reason": reason,
                        "tokens": [self.tokenizer.decode([x]) for x in row], "logprobs": row_logprobs}
                       for row, row_logprobs, reason in zip(ids, token_logprobs, reasons)]
        if not request.logprobs:
            for result in results:
                del result["tokens"], result["logprobs"]
        return results


class Generation:
    """A batch being generated. Every prompt is prefilled whole (padded to the longest), then each step gives every
    live row one token at its own position, until a stop token (the model's, or one asked for), a stop string asked
    for with `stop`, or the row's length; a finished row leaves the batch (on accelerators at the next check of which
    rows are done; the compiled step keeps its batch, so finished rows repeat their last position there)."""

    def __init__(self, llama: Llama, request: Request, stop_ids: List[int]):
        prompt_tokens, max_gen_len = request.prompt_tokens, request.max_gen_len
        self.llama, self.logprobs = llama, request.logprobs
        self.temperature, self.top_p = request.temperature, request.top_p
        self.pad_id = llama.tokenizer.pad_id
        self.stop_ids = stop_ids
        self.device = device = llama.model.tok_embeddings.weight.device
        # a call's own seed draws from a generator of its own; else torch's global one (seeded in Llama.build)
        self.generator = None if request.seed is None else torch.Generator(device).manual_seed(request.seed)
        bsz = len(prompt_tokens)
        self.prompt_lens = [len(t) for t in prompt_tokens]
        self.ends = [min(llama.model.params.max_seq_len, n + max_gen_len) for n in self.prompt_lens]  # last lengths
        self.total_len, prompt_len = max(self.ends), max(self.prompt_lens)

        self.tokens = torch.zeros((bsz, self.total_len), dtype=torch.long, device=device)  # 0 (unk) pads the prefill
        for i, t in enumerate(prompt_tokens):
            self.tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        self.all_logprobs = torch.zeros((bsz, self.total_len), dtype=torch.float, device=device) if self.logprobs else None
        self.position = torch.tensor(self.prompt_lens, device=device)  # each row's next position to fill
        self.end = torch.tensor(self.ends, device=device)
        self.stop_tensor = torch.tensor(stop_ids, device=device)
        self.live = self.position < self.end  # rows still generating

        if self.logprobs:  # every prompt token's logits, for the prompt's log-probabilities
            logits = llama.model.forward(self.tokens[:, :prompt_len], 0)
            self.all_logprobs[:, 1:prompt_len] = token_logprobs(logits[:, :-1], self.tokens[:, 1:prompt_len],
                                                                self.pad_id)
            last = logits[torch.arange(bsz, device=device), self.position - 1]
        else:  # only each prompt's last token's
            last = llama.model.forward(self.tokens[:, :prompt_len], 0, logits_at=self.position - 1)[:, 0]
        self.batch = list(range(bsz)) if llama.compiled_step is not None else [  # fixed shapes when compiled
            i for i in range(bsz) if self.prompt_lens[i] < self.ends[i]]
        self.batch_rows = torch.tensor(self.batch, dtype=torch.long, device=device)
        self.last = last[self.batch_rows]  # (A, V): each row's next logits
        self.stopped = set()  # rows `stop` ended

    def stop(self, row: int) -> None:
        """End a row now (a stop string in its text): it leaves the batch at the next step."""
        self.stopped.add(row)
        self.live[row] = False

    def steps(self, every_step: bool) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """Generate; after each step yield its rows, their new tokens (A,), whether each was written, i.e. the row
        was still live (A,) bool, and their log-probabilities (A,) when asked, all on the device. every_step: read
        which rows are done after every step (as a stream does anyway), not every EOS_CHECK_INTERVAL steps only."""
        tokens, position, live, end = self.tokens, self.position, self.live, self.end
        last_position = list(self.prompt_lens)  # a bound on each row's position kept on the host: no device reads
        step = 0
        while self.batch and any(last_position[i] < self.ends[i] for i in self.batch):
            batch, batch_rows = self.batch, self.batch_rows
            next_token = sample_next(self.last, self.temperature, self.top_p, self.generator)
            at = position[batch_rows]
            writing = live[batch_rows]
            slot = at.clamp(max=self.total_len - 1)  # rows that are done write their last token back
            tokens[batch_rows, slot] = torch.where(writing, next_token, tokens[batch_rows, slot])
            new_logprobs = None
            if self.logprobs:
                new_logprobs = token_logprobs(self.last[:, None], next_token[:, None], self.pad_id)[:, 0]
                self.all_logprobs[batch_rows, slot] = torch.where(writing, new_logprobs,
                                                                  self.all_logprobs[batch_rows, slot])
            position[batch_rows] = at + writing
            live[batch_rows] = (writing & ~torch.isin(next_token, self.stop_tensor)
                                & (position[batch_rows] < end[batch_rows]))
            for i in batch:
                last_position[i] = min(last_position[i] + 1, self.ends[i])
            yield batch, next_token, writing, new_logprobs
            step += 1
            # Reading `live` waits for the device; on accelerators do it every few steps so decoding never stalls
            # on it (rows that finished meanwhile only rewrite their last position).
            if every_step or self.device.type == "cpu" or step % EOS_CHECK_INTERVAL == 0:
                still = live.tolist()
                if not any(still):
                    break
                if self.llama.compiled_step is None and not all(still[i] for i in batch):
                    self.batch = [i for i in batch if still[i]]
                    self.batch_rows = torch.tensor(self.batch, dtype=torch.long, device=self.device)
            if not any(last_position[i] < self.ends[i] for i in self.batch):
                break
            start = position[self.batch_rows] - 1  # each row's newest token goes in
            rows = None if self.batch == list(range(len(self.batch))) else self.batch_rows
            cache_len = max(last_position[i] for i in self.batch)
            self.last = self.llama.decode(tokens[self.batch_rows, start][:, None], start, rows, cache_len)[:, -1]

    def run(self, echo: bool) -> Tuple[List[List[int]], List[List[float]], List[str]]:
        """Generate to the end without reading anything back per step; then `results`."""
        for _ in self.steps(every_step=False):
            pass
        return self.results(echo)

    def results(self, echo: bool) -> Tuple[List[List[int]], List[List[float]], List[str]]:
        """Per row: its ids (the prompt's too with echo) cut before its first stop token, their log-probabilities
        (when asked; the first prompt token has none: 0.0), and why it ended ("stop" or "length")."""
        out_tokens, out_logprobs, reasons = [], [], []
        token_rows, positions = self.tokens.tolist(), self.position.tolist()
        logprob_rows = self.all_logprobs.tolist() if self.logprobs else None
        for i, prompt_len in enumerate(self.prompt_lens):
            start = 0 if echo else prompt_len
            generated = token_rows[i][prompt_len : positions[i]]
            cut = [k for k, t in enumerate(generated) if t in self.stop_ids][:1]  # a generated stop token only
            stop = prompt_len + cut[0] if cut else positions[i]
            out_tokens.append(token_rows[i][start:stop])
            out_logprobs.append(logprob_rows[i][start:stop] if self.logprobs else [])
            reasons.append("stop" if cut or i in self.stopped else "length")
        return out_tokens, out_logprobs, reasons
