"""An OpenAI-compatible HTTP server for a Llama 2 checkpoint, batching concurrent requests continuously, with a chat
page.

    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model [--port 8000] [--api-key KEY]
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model

GET / (the chat page), GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions; docs/serve.md
has the details. The model runs on the scheduler's worker thread (llama/batching.py); this module is the HTTP side:
it checks each request (every refusal comes before any compute), hands it to the scheduler, and writes the events
it gets back as OpenAI's JSON or server-sent events. Under torchrun rank 0 serves and the other ranks follow its
steps.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import time
import uuid
from typing import AsyncIterator, List, Optional, Sequence, Tuple, Union

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as err:  # the core library does without them
    raise ImportError(f"the server needs FastAPI and uvicorn ({err}): pip install -e '.[serve]'") from err
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from llama import runtime
from llama.batching import Failure, Finish, Job, QueueFull, Scheduler, Token, follow
from llama.cli import run
from llama.dialog import Dialog, encode_dialog, validate_dialog
from llama.formats import open_checkpoint
from llama.generation import Llama
from llama.streaming import check_stops
from llama.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (a chat answer may fill the context)
MAX_STOPS = 16
RETRY_BUSY_S, RETRY_LOADING_S = 1, 5  # the Retry-After of a 503 when the queue is full, or the model still loads
# The page's own policy: its script and style from this server only, no inline code, requests to this server only.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

# OpenAI parameters this server does not implement, with the values that mean "not used" (which some clients send
# anyway): any other value is refused with a 400 rather than ignored. null always means "not used".
UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logit_bias": ({},), "presence_penalty": (0,),
    "frequency_penalty": (0,), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (),
    "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (), "store": (False,),
    "metadata": (), "service_tier": ("auto", "default"),
}


class APIError(Exception):
    """A refusal answered in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, with its status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- Requests ----------------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[bool] = None


class Params(BaseModel):
    """What both endpoints take; null means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[None, str, List[str]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # OpenAI's end-user id: accepted, not used

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = check_stops(stop)
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return stops


class CompletionParams(Params):
    prompt: Union[str, List[StrictInt], List[str], List[List[StrictInt]]]  # text, or token ids; one prompt
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # the chosen token's, and this many of the likeliest


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind):
        if kind != "text":
            raise ValueError(f"content parts of type {kind!r} are not supported: text only")
        return kind


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: Union[str, List[TextPart]]

    @field_validator("role")
    @classmethod
    def _role(cls, role):
        if role not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"role {role!r} is not supported: system (or developer), user or assistant")
        return role


class ChatParams(Params):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


async def parse(request: Request, model: type) -> Params:
    """The request's JSON body as `model`, or a 400 naming the parameter at fault."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}")
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    for name, unused in UNSUPPORTED.items():
        if data.get(name) is not None and data[name] not in unused:
            raise APIError(400, f"{name}={json.dumps(data[name])} is not supported by this server", param=name,
                           code="unsupported_parameter")
        data.pop(name, None)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # the deepest error says most (of a union's, the branch that got furthest); param is the top-level field
        error = max(err.errors(), key=lambda e: len(e["loc"]))
        param = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {error['loc'][-1]}", param=param)
        raise APIError(400, f"invalid {param}: {error['msg'].removeprefix('Value error, ')}", param=param)


def completion_prompt(tokenizer: Tokenizer, prompt) -> List[int]:
    """A completion's prompt ids: text gets BOS, as text_completion's; token ids are taken as given."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"{len(prompt)} prompts in one request: send one prompt per request (concurrent "
                                "requests are batched together)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=True, eos=False)
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if not all(0 <= t < tokenizer.n_words for t in prompt):
        raise APIError(400, f"prompt token ids must be in 0..{tokenizer.n_words - 1}", param="prompt")
    return prompt


def chat_dialog(messages: List[ChatMessage], special_tags: Sequence[str]) -> Dialog:
    """The messages as a dialog (developer is system), refusing ones the chat format cannot hold: roles out of order,
    or text with the format's own tags (Llama 2's [INST] and <<SYS>>; Llama 3's format has none)."""
    dialog = []
    for i, message in enumerate(messages):
        content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
        tags = [tag for tag in special_tags if tag in content]
        if tags:
            raise APIError(400, f"messages[{i}] contains {tags[0]}, one of the chat format's tags "
                                f"({', '.join(special_tags)}): messages may not contain them", param="messages",
                           code="invalid_prompt")
        dialog.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    try:
        validate_dialog(dialog)
    except ValueError as err:
        raise APIError(400, str(err).replace("dialog", "messages", 1), param="messages")
    return dialog


def completion_budget(llama: Llama, prompt_len: int, max_tokens: Optional[int], default: Optional[int],
                      prompt_param: str) -> int:
    """max_tokens as asked (else `default`, else the rest of the context), refused when the prompt and it do not
    fit the context."""
    max_seq_len = llama.model.params.max_seq_len
    room = max_seq_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens; the prompt is "
                            f"{prompt_len} tokens long, which leaves no room for a completion. Shorten it.",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return min(room, default or room)
    if max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            "completion). Reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


# --- Responses ---------------------------------------------------------------------------------------------------

def token_piece(tokenizer: Tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token's text as OpenAI's logprobs show it, and its bytes: a token that is no whole UTF-8 text on its own
    (part of a character) as 'bytes:\\xNN...'."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode(), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


class Answer:
    """One response in OpenAI's shapes, a chat or a text completion: its chunks when streamed, or the whole."""

    def __init__(self, chat: bool, model: str, tokenizer: Tokenizer, logprobs: bool, prompt_tokens: int):
        self.chat, self.model, self.tokenizer, self.logprobs = chat, model, tokenizer, logprobs
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offset = 0  # characters of token text so far: a completion's logprobs' text_offset

    def chunk(self, text: str, tokens: List[Token], finish_reason: Optional[str] = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=self._logprobs(tokens), finish_reason=finish_reason)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def whole(self, text: str, tokens: List[Token], finish: Finish) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=self._logprobs(tokens), finish_reason=finish.reason)
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**body, "usage": self.usage(finish)}

    def usage_chunk(self, finish: Finish) -> dict:
        """The stream's last chunk with stream_options.include_usage: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": self.usage(finish)}

    def usage(self, finish: Finish) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": finish.completion_tokens,
                "total_tokens": self.prompt_tokens + finish.completion_tokens}

    def _envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, tokens: List[Token]) -> Optional[dict]:
        if not (self.logprobs and tokens):
            return None
        if self.chat:
            def entry(token: int, logprob: float) -> dict:
                text, utf8 = token_piece(self.tokenizer, token)
                return {"token": text, "logprob": logprob, "bytes": utf8}

            return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}
                                for t in tokens]}
        texts = [token_piece(self.tokenizer, t.id)[0] for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        top = [{token_piece(self.tokenizer, i)[0]: lp for i, lp in t.top} if t.top else None for t in tokens]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top if any(t.top for t in tokens) else None, "text_offset": offsets}


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class JobEvents:
    """One job's events as the event loop reads them. The worker thread puts them in a queue; a client that
    disconnects cancels the job at once (its row is freed at the next step) and ends the reading."""

    def __init__(self, scheduler: Scheduler, request: Request):
        self.scheduler, self.request = scheduler, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Optional[Job] = None
        self.watcher: Optional[asyncio.Task] = None

    def emit(self, event) -> None:
        """The worker thread's way in."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server has stopped, nobody is reading
            pass

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(503, f"The server is busy ({err}): retry later", code="server_busy",
                           headers={"Retry-After": str(RETRY_BUSY_S)})
        except RuntimeError as err:  # closed or failed since the request was checked
            raise APIError(503, f"The server cannot take requests: {err}", code="unavailable")
        self.job = job
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(self.job)
        self.queue.put_nowait(None)

    async def events(self) -> AsyncIterator[Union[Token, Finish, Failure]]:
        """The events up to the job's last one, or until the client has gone."""
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event
            if not isinstance(event, Token):
                return

    def close(self) -> None:
        """Stop watching the client, and drop the job if it is still running (the client stopped reading)."""
        if self.watcher is not None:
            self.watcher.cancel()
        if self.job is not None:
            self.scheduler.cancel(self.job)


def failure_error(failure: Failure) -> APIError:
    if failure.closing:
        return APIError(503, failure.message, code="shutting_down")
    return APIError(500, failure.message, code="internal_error")


async def respond(request: Request, scheduler: Scheduler, answer: Answer, job_args: dict, params: Params):
    """Run the job; its answer as one JSON body, or as server-sent events ending in `data: [DONE]`."""
    events = JobEvents(scheduler, request)
    events.submit(Job(emit=events.emit, **job_args))
    if params.stream:
        include_usage = bool(params.stream_options and params.stream_options.include_usage)
        return StreamingResponse(stream(events, answer, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, tokens = [], []
    try:
        async for event in events.events():
            if isinstance(event, Token):
                text.append(event.text)
                tokens.append(event)
            elif isinstance(event, Finish):
                return answer.whole("".join(text) + event.text, tokens, event)
            else:
                raise failure_error(event)
        return JSONResponse({}, status_code=499)  # the client has gone: nobody reads this
    finally:
        events.close()


async def stream(events: JobEvents, answer: Answer, include_usage: bool) -> AsyncIterator[str]:
    """The job's events as OpenAI's chunks: text and logprobs as they come, the finish reason, then [DONE]."""
    try:
        if answer.chat:
            yield sse(answer.chunk("", [], first=True))
        async for event in events.events():
            if isinstance(event, Token):
                if event.text or answer.logprobs:
                    yield sse(answer.chunk(event.text, [event]))
            elif isinstance(event, Finish):
                if event.text:
                    yield sse(answer.chunk(event.text, []))
                yield sse(answer.chunk("", [], finish_reason=event.reason))
                if include_usage:
                    yield sse(answer.usage_chunk(event))
            else:
                yield sse(failure_error(event).body())
        yield sse("[DONE]")
    finally:
        events.close()


# --- The app -----------------------------------------------------------------------------------------------------

def is_public(path: str) -> bool:
    """The chat page's files: served without the API key (the page asks for it)."""
    return path == "/" or path.startswith("/static/")


class Guard:
    """What every request passes before the routes: the API key (when one is set; not for the page's files), then a
    body of at most max_body_bytes, read whole here."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and not is_public(scope["path"]) and not self._authorized(headers.get("authorization", "")):
            error = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than this server's limit of {self.max_body_bytes} "
                                  "bytes.", code="request_too_large")
        if not headers.get("content-length", "0").isdigit():
            return await APIError(400, "invalid Content-Length").response()(scope, receive, send)
        if int(headers.get("content-length", "0")) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:  # a chunked body with no Content-Length
                return await too_large.response()(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the client's own messages (its disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, authorization: str) -> bool:
        scheme, _, key = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


def create_app(scheduler: Scheduler, model_name: str, api_key: Optional[str] = None, max_body_bytes: int = 1 << 20,
               allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The HTTP API over a scheduler, which it starts (to load the model) as the server starts, and closes, waiting for
    its worker, as the server stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()
        if scheduler.state != "loading":  # (a build cannot be interrupted: the process exits without it)
            await asyncio.to_thread(scheduler.thread.join)

    app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if allowed_origins:  # pages of these origins may call the API; outside the Guard, as preflights carry no key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        message = (f"{request.method} {request.url.path} is not a route of this server" if err.status_code == 404
                   else str(err.detail))
        return APIError(err.status_code, message, code="not_found" if err.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal_error(request, err: Exception):
        return APIError(500, "internal server error", code="internal_error").response()

    def ready_model(params: Params) -> Llama:
        """The model, once loaded, and checked to be the one asked for."""
        if params.model is not None and params.model != model_name:
            raise APIError(404, f"The model `{params.model}` does not exist: this server serves `{model_name}`.",
                           param="model", code="model_not_found")
        if scheduler.state == "loading":
            raise APIError(503, "The model is loading: retry shortly.", code="loading",
                           headers={"Retry-After": str(RETRY_LOADING_S)})
        if scheduler.state != "ready":
            raise APIError(503, f"The model is {scheduler.state}.", code="unavailable")
        return scheduler.llama

    def sampling(params: Params) -> dict:
        """The job's sampling settings: those given (Job's defaults, Meta's, for the others)."""
        given = {"temperature": params.temperature, "top_p": params.top_p, "stop": params.stop, "seed": params.seed}
        return {name: value for name, value in given.items() if value is not None}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if scheduler.state == "ready" else scheduler.state, "model": model_name,
                "running": scheduler.running, "waiting": scheduler.queued}
        if scheduler.llama is not None:
            params = scheduler.llama.model.params
            body.update(max_seq_len=params.max_seq_len, max_batch_size=params.max_batch_size)
        return JSONResponse(body, status_code=200 if scheduler.state == "ready" else 503)

    def model_card() -> dict:
        card = {"id": model_name, "object": "model", "created": started, "owned_by": "llama"}
        if scheduler.llama is not None:
            card["max_model_len"] = scheduler.llama.model.params.max_seq_len
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        params = await parse(request, CompletionParams)
        llama = ready_model(params)
        prompt = await run_in_threadpool(completion_prompt, llama.tokenizer, params.prompt)
        max_tokens = completion_budget(llama, len(prompt), params.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt")
        answer = Answer(False, model_name, llama.tokenizer, params.logprobs is not None, len(prompt))
        job = dict(prompt=prompt, max_tokens=max_tokens, logprobs=params.logprobs, **sampling(params))
        return await respond(request, scheduler, answer, job, params)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        params = await parse(request, ChatParams)
        llama = ready_model(params)
        if params.top_logprobs and not params.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        dialog = chat_dialog(params.messages, llama.chat_format.special_tags)
        prompt = await run_in_threadpool(encode_dialog, llama.tokenizer, dialog)
        max_tokens = completion_budget(llama, len(prompt), params.max_completion_tokens or params.max_tokens, None,
                                       "messages")
        answer = Answer(True, model_name, llama.tokenizer, bool(params.logprobs), len(prompt))
        job = dict(prompt=prompt, max_tokens=max_tokens, logprobs=(params.top_logprobs or 0) if params.logprobs
                   else None, **sampling(params))
        return await respond(request, scheduler, answer, job, params)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C (or SIGTERM) first closes the scheduler: the answers being written end at
    once, with an error event, instead of uvicorn waiting for each to finish."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.close()
        super().handle_exit(sig, frame)


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_seq_len: int = 2048,
    max_batch_size: int = 8,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    compile: bool = False,
    seed: int = 1,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_queue: int = 64,
    prefill_chunk: int = 512,
    max_body_bytes: int = 1 << 20,
    allowed_origins: Union[None, str, Sequence[str]] = None,
    log_level: str = "info",
    threads: Optional[int] = None,
):
    """Serve the model in ckpt_dir over HTTP on host:port (127.0.0.1: this machine only; 0.0.0.0 for every network).
    The build flags are the examples'; max_batch_size requests run at once, each in its own KV-cache row, and up to
    max_queue more wait. --api-key (or $LLAMA_API_KEY) is then required of every request but the chat page's files.
    model_name: the name clients ask for (default: ckpt_dir's). prefill_chunk: padded prompt tokens prefilled per
    step. max_body_bytes bounds a request's size. allowed_origins: web origins (comma-separated) whose pages may call
    the API from a browser (CORS); none by default. --threads fixes the number of CPU threads."""
    runtime.check_device(device)  # what can be checked before the server starts and the model loads
    runtime.check_threads(threads)
    open_checkpoint(ckpt_dir)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    # (fire turns a flag that looks like a number into one: a key or name is text)
    api_key = str(api_key) if api_key is not None else os.environ.get("LLAMA_API_KEY") or None
    model_name = str(model_name) if model_name is not None else os.path.basename(os.path.normpath(ckpt_dir))

    def load() -> Llama:
        return Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, device=device,
                           dtype=dtype, quantize=quantize, group_size=group_size, compile=compile, threads=threads)

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: compute rank 0's steps until it stops
        # Ctrl-C in a terminal, or torchrun's SIGTERM, reaches every rank: rank 0 shuts down, then tells the others
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        follow(load())
        return
    server: Optional[Server] = None

    def stop_serving() -> None:  # loading or a step failed: the server exits, with the error
        server.should_exit = True

    scheduler = Scheduler(load, max_queue, prefill_chunk, on_failure=stop_serving)
    if isinstance(allowed_origins, str):
        allowed_origins = allowed_origins.split(",")
    app = create_app(scheduler, model_name, api_key, max_body_bytes, allowed_origins or ())
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5),
                    scheduler)
    try:
        server.run()  # the model loads meanwhile: /health says "loading" until it is ready
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it handled again once it has shut down
        pass
    if scheduler.error is not None:
        raise scheduler.error  # printed as one line by llama.cli


def entry_point() -> None:
    """The `llama-serve` console script."""
    run(main, "llama-serve")


if __name__ == "__main__":
    run(main, "python -m llama.serve")
