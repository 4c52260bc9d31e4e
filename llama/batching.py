"""Continuous batching: requests share the model's KV-cache rows, each at its own position, joining and leaving the
running batch between steps.

A `Scheduler` owns the model on one worker thread. Each step it
1. admits waiting jobs into free cache rows, first come first served;
2. decodes one token for every row whose prompt is in the cache, in one batched step at each row's own position;
3. prefills the next chunks of new prompts, at most `prefill_tokens` (padded) tokens in one forward, so a long prompt
   holds the running rows back by one chunk's forward per step, not by its whole prefill;
and samples each row's next token with that job's own settings (and its own generator when it has a seed). A job
ends, and its row is free for the next step, at EOS, a stop string, its max_tokens, or when it is cancelled.

Other threads talk to the worker through thread-safe calls: `submit` queues a job (or raises QueueFull), `cancel`
marks one to drop at the next step, `close` ends every job and the worker; each job's events (`Token`, then one
`Finish` or `Failure`) go to the `emit` callback it was made with, called on the worker thread.

Under torchrun every rank computes every step. Rank 0 leads: it plans each step and sends the `Plan` (which tokens
go into which rows at which positions) to the other ranks, which `follow` it. Only the leader samples; the tokens it
samples reach the others in the next step's plan, so every rank computes the same thing.
"""

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama import runtime
from llama.generation import Llama, sample_next
from llama.streaming import RowText

log = logging.getLogger(__name__)


@dataclass
class Token:
    """One generated token (a stop token, such as EOS, is never one) and the text it made safe to release (often
    '')."""

    id: int
    text: str
    logprob: Optional[float] = None  # natural log, with logprobs asked for
    top: Optional[List[Tuple[int, float]]] = None  # the most likely tokens (id, logprob), with logprobs > 0


@dataclass
class Finish:
    """A job's last event: its text still held back, why it ended ("stop": a stop token such as EOS, or a stop
    string; "length": max_tokens) and how many tokens it generated (a stop token counts)."""

    text: str
    reason: str
    completion_tokens: int


@dataclass
class Failure:
    """A job's last event when it could not be completed: the scheduler is closing, or a step failed."""

    message: str
    closing: bool = False


Event = Union[Token, Finish, Failure]


class QueueFull(Exception):
    """submit() when max_batch_size jobs run and max_queue wait already."""


class Job:
    """A request in the scheduler: what was asked, its cache row and how far it got."""

    def __init__(self, prompt: List[int], max_tokens: int, emit: Callable[[Event], None], temperature: float = 0.6,
                 top_p: float = 0.9, stop: Sequence[str] = (), seed: Optional[int] = None,
                 logprobs: Optional[int] = None):
        """prompt: token ids; max_tokens: tokens to generate at most; temperature and top_p default to Meta's (as in
        Llama 2's generation_config.json); stop: stop strings; logprobs: None for none, else how many of the most
        likely tokens to report beside each token's own logprob."""
        self.prompt, self.max_tokens, self.emit = prompt, max_tokens, emit
        self.temperature, self.top_p, self.stop, self.seed, self.logprobs = temperature, top_p, stop, seed, logprobs
        self.cancelled = False
        # the worker's, from admission on
        self.row: Optional[int] = None
        self.cached = 0  # tokens of this job in its cache row
        self.next_token: Optional[int] = None  # sampled, to be fed at position `cached` in the next decode step
        self.generated = 0
        self.text: Optional[RowText] = None
        self.generator: Optional[torch.Generator] = None  # its own when it has a seed, else torch's global one


@dataclass
class Plan:
    """One step's work, the same on every rank: decode gives each of its rows one token, (row, token, position);
    prefill writes chunks of prompts, (row, first position, tokens)."""

    decode: List[Tuple[int, int, int]] = field(default_factory=list)
    prefill: List[Tuple[int, int, List[int]]] = field(default_factory=list)
    stop: bool = False  # the leader is closing: followers return


def run_decode(llama: Llama, plan: Plan) -> Optional[torch.Tensor]:
    """The plan's decode step -> each decoded row's next-token logits (B, V), fp32."""
    if not plan.decode:
        return None
    device = llama.model.tok_embeddings.weight.device
    rows, tokens, positions = (torch.tensor(column, device=device) for column in zip(*plan.decode))
    cache_len = max(position for _, _, position in plan.decode) + 1
    return llama.decode(tokens[:, None], positions, rows, cache_len)[:, -1]


def run_prefill(llama: Llama, plan: Plan) -> Optional[torch.Tensor]:
    """The plan's prompt chunks, in one forward padded to the longest -> the logits after each chunk's last token
    (B, V), fp32. Padding writes keys and values past a row's chunk; its own tokens overwrite them before that row
    ever attends there."""
    if not plan.prefill:
        return None
    device = llama.model.tok_embeddings.weight.device
    width = max(len(chunk) for _, _, chunk in plan.prefill)
    tokens = torch.zeros((len(plan.prefill), width), dtype=torch.long)  # 0 (unk) pads, as in Generation
    for i, (_, _, chunk) in enumerate(plan.prefill):
        tokens[i, : len(chunk)] = torch.tensor(chunk)
    rows = torch.tensor([row for row, _, _ in plan.prefill], device=device)
    starts = torch.tensor([start for _, start, _ in plan.prefill], device=device)
    cache_len = max(start for _, start, _ in plan.prefill) + width
    last = torch.tensor([len(chunk) - 1 for _, _, chunk in plan.prefill], device=device)
    return llama.model.forward(tokens.to(device), starts, rows, cache_len, logits_at=last)[:, 0]


def follow(llama: Llama) -> None:
    """The other ranks' loop under torchrun: compute the leader's plans until it closes."""
    with torch.inference_mode():
        while True:
            plan = runtime.from_rank0(None)
            if plan.stop:
                return
            run_decode(llama, plan)
            run_prefill(llama, plan)


class Scheduler:
    """Loads the model and runs continuous batching on a worker thread (see the module's docstring)."""

    def __init__(self, load: Callable[[], Llama], max_queue: int = 64, prefill_tokens: int = 512,
                 on_failure: Callable[[], None] = lambda: None):
        """load() builds the model, on the worker thread; max_queue: jobs that may wait for a row; prefill_tokens:
        padded prompt tokens per step; on_failure() is called (on the worker) if loading or a step fails."""
        if max_queue < 0 or prefill_tokens < 1:
            raise ValueError(f"max_queue ({max_queue}) must be >= 0 and prefill_tokens ({prefill_tokens}) >= 1")
        self.max_queue, self.prefill_tokens, self.on_failure = max_queue, prefill_tokens, on_failure
        self.llama: Optional[Llama] = None
        self.state = "loading"  # then "ready", and "failed" or "closed"
        self.error: Optional[BaseException] = None
        self.inbox: "queue.Queue[Optional[Job]]" = queue.Queue()  # submitted jobs; None asks the worker to close
        self.lock = threading.Lock()
        self.pending = 0  # jobs submitted and not yet ended, under lock
        self.closing = False  # close() was called, under lock
        self.waiting: "collections.deque[Job]" = collections.deque()  # the worker's from here on
        self.active: List[Job] = []  # in admission order
        self.free_rows: List[int] = []
        self.stop_ids: Set[int] = set()
        self.distributed = False  # under torchrun: plans go to the other ranks
        self.heartbeat_s = 0.0
        self.thread = threading.Thread(target=self._work, args=(load,), name="llama-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def queued(self) -> int:
        """Jobs accepted that have no row yet."""
        return max(0, self.pending - len(self.active))

    def submit(self, job: Job) -> None:
        """Queue a job (any thread); raises QueueFull when the queue is full, RuntimeError unless ready."""
        if self.state != "ready":
            raise RuntimeError(f"the model is {self.state}")
        params = self.llama.model.params
        if not 0 < len(job.prompt) < params.max_seq_len or not 0 < job.max_tokens <= params.max_seq_len - len(
                job.prompt):
            raise ValueError(f"a prompt of {len(job.prompt)} tokens and max_tokens={job.max_tokens} do not fit "
                             f"max_seq_len={params.max_seq_len}")
        with self.lock:  # (so that no job follows close()'s sentinel into the inbox)
            if self.closing:
                raise RuntimeError("the server is shutting down")
            if self.pending >= params.max_batch_size + self.max_queue:
                raise QueueFull(f"{len(self.active)} requests are running and {self.queued} waiting")
            self.pending += 1
            self.inbox.put(job)

    def cancel(self, job: Job) -> None:
        """Drop a job (any thread): its row is freed at the next step. Nothing happens to a job that has ended."""
        job.cancelled = True

    def close(self) -> None:
        """End every job with a Failure and stop the worker (any thread, any number of times)."""
        with self.lock:
            self.closing = True
            self.inbox.put(None)

    def _work(self, load: Callable[[], Llama]) -> None:
        try:
            self.llama = load()
        except Exception as err:
            self.state, self.error = "failed", err
            log.error("the model could not be loaded: %s", err)
            self.on_failure()
            return
        params = self.llama.model.params
        self.stop_ids = set(self.llama.tokenizer.stop_ids)  # EOS, and Llama 3's end of turn
        self.free_rows = list(range(params.max_batch_size))
        self.distributed = fs_init.get_model_parallel_world_size() > 1
        # an idle leader sends an empty plan this often, well within the collectives' time limit
        self.heartbeat_s = runtime.collective_timeout().total_seconds() / 4
        self.state = "ready"
        log.info("model ready: max_seq_len %d, max_batch_size %d", params.max_seq_len, params.max_batch_size)
        try:
            with torch.inference_mode():
                self._loop()
            self.state = "closed"
        except Exception as err:  # the cache rows (and, under torchrun, the ranks) may be out of step: stop serving
            self.state, self.error = "failed", err
            log.exception("a step failed")
            self._end_all(Failure(f"the model failed: {err}"))
            self.on_failure()

    def _loop(self) -> None:
        while self._take_inbox(block=not (self.active or self.waiting)):
            for job in [j for j in (*self.active, *self.waiting) if j.cancelled]:
                self._end(job, None)
            while self.waiting and self.free_rows:
                job = self.waiting.popleft()
                self._admit(job)
            plan = self._plan()
            if self.distributed:
                runtime.from_rank0(plan)  # when idle, an empty plan: the heartbeat
            decoded = [j for j in self.active if j.next_token is not None]
            logits = run_decode(self.llama, plan)
            if logits is not None:
                for job in decoded:
                    job.cached += 1
                self._sample(decoded, logits)
            prefilled = [j for j in self.active if j.row in {row for row, _, _ in plan.prefill}]
            logits = run_prefill(self.llama, plan)
            if logits is not None:
                chunks = {row: len(chunk) for row, _, chunk in plan.prefill}
                for job in prefilled:
                    job.cached += chunks[job.row]
                done = [i for i, job in enumerate(prefilled) if job.cached == len(job.prompt)]
                if done:
                    self._sample([prefilled[i] for i in done], logits[done])
        self._end_all(Failure("the server is shutting down", closing=True))
        if self.distributed:
            runtime.from_rank0(Plan(stop=True))

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted jobs to the waiting line (waiting up to a heartbeat for one when block); False once
        close() was called."""
        try:
            job = self.inbox.get(timeout=self.heartbeat_s) if block else self.inbox.get_nowait()
            while job is not None:
                self.waiting.append(job)
                job = self.inbox.get_nowait()
            return False
        except queue.Empty:
            return True

    def _admit(self, job: Job) -> None:
        job.row = self.free_rows.pop(0)
        job.text = RowText(self.llama.tokenizer, job.stop)
        if job.seed is not None:
            device = self.llama.model.tok_embeddings.weight.device
            job.generator = torch.Generator(device).manual_seed(job.seed)  # as Llama.generate(seed=) seeds
        self.active.append(job)

    def _plan(self) -> Plan:
        """This step's work: every row with a sampled token decodes it; prompts waiting for prefill get chunks in
        admission order while the padded chunk batch stays within prefill_tokens and every padded row within the
        cache."""
        plan = Plan(decode=[(j.row, j.next_token, j.cached) for j in self.active if j.next_token is not None])
        max_seq_len = self.llama.model.params.max_seq_len
        width, room = 0, max_seq_len
        for job in (j for j in self.active if j.cached < len(j.prompt)):
            room = min(room, max_seq_len - job.cached)  # padded to `width`, no row may run past the cache
            cap = min(self.prefill_tokens // (len(plan.prefill) + 1), room)
            if width > cap:
                break
            chunk = job.prompt[job.cached : job.cached + cap]
            plan.prefill.append((job.row, job.cached, chunk))
            width = max(width, len(chunk))
        return plan

    def _sample(self, jobs: List[Job], logits: torch.Tensor) -> None:
        """Each job's next token from its logits (B, V): greedy, or sampled with its own settings and generator;
        then handled."""
        tokens = logits.argmax(dim=-1)
        for i, job in enumerate(jobs):
            if job.temperature > 0:
                tokens[i] = sample_next(logits[i : i + 1], job.temperature, job.top_p, job.generator)[0]
        logprobs = [None] * len(jobs)
        tops = [None] * len(jobs)
        asked = [i for i, job in enumerate(jobs) if job.logprobs is not None]
        if asked:
            log_probs = torch.log_softmax(logits[asked], dim=-1)  # (A, V)
            chosen = log_probs.gather(-1, tokens[asked][:, None])[:, 0].tolist()
            k = max(jobs[i].logprobs for i in asked)
            top_values, top_ids = log_probs.topk(k, dim=-1) if k else (log_probs[:, :0], log_probs[:, :0])
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
            for a, i in enumerate(asked):
                logprobs[i] = chosen[a]
                n = jobs[i].logprobs
                tops[i] = list(zip(top_ids[a][:n], top_values[a][:n])) if n else None
        for job, token, logprob, top in zip(jobs, tokens.tolist(), logprobs, tops):
            self._take(job, token, logprob, top)

    def _take(self, job: Job, token: int, logprob: Optional[float], top) -> None:
        """A job's newly sampled token: released as text, or the job's end (as Llama.stream ends a row)."""
        job.generated += 1
        if token in self.stop_ids:
            self._end(job, "stop")
            return
        job.emit(Token(token, job.text.add(token), logprob, top))
        if job.text.stopped:
            self._end(job, "stop")
        elif job.generated == job.max_tokens:
            self._end(job, "length")
        else:
            job.next_token = token

    def _end(self, job: Job, reason: Optional[str]) -> None:
        """Free the job's row and tell its client why it ended (nothing when it was cancelled)."""
        if job.row is not None:
            self.active.remove(job)
            self.free_rows.append(job.row)
            self.free_rows.sort()
        else:
            self.waiting.remove(job)
        with self.lock:
            self.pending -= 1
        if reason is not None:
            job.emit(Finish(job.text.finish(), reason, job.generated))

    def _end_all(self, failure: Failure) -> None:
        """End every job, waiting or running, with `failure` (shutting down, or the model failed)."""
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.waiting.append(job)
        for job in (*self.active, *self.waiting):
            self._end(job, None)
            job.emit(failure)
