"""The HTTP server as users run it: `python -m llama.serve` (and under torchrun) in a subprocess on 127.0.0.1 with a
tiny fp32 checkpoint, driven through OpenAI's Python client and raw HTTP; and its scheduler in this process, against
the library's own generation, token id for token id."""

import asyncio
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import pytest

from llama.batching import Finish, Job, Scheduler, Token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
KEY = "test-key"
ALLOWED_ORIGIN = "http://ui.example"
MAX_SEQ_LEN, MAX_BATCH, MAX_QUEUE = 4096, 4, 28  # 32 requests at once fit: 4 running and 28 waiting
# the server runs in a subprocess on the CPU; the Scheduler's tests at the end run in this process, on the test device
SUBPROCESS = pytest.mark.cpu_only("the server runs in a subprocess on the CPU")


class Server:
    """`llama.serve` in a subprocess on a free port of 127.0.0.1, ready once /health says so."""

    def __init__(self, launcher, ckpt_dir, tokenizer_path, *flags, env=None, api_key=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        command = [*launcher, "-m", "llama.serve", "--ckpt_dir", str(ckpt_dir), "--tokenizer_path",
                   str(tokenizer_path), "--device", "cpu", "--dtype", "fp32", "--port", str(self.port),
                   "--log_level", "warning", *map(str, flags)]
        self.log = tempfile.TemporaryFile("w+")  # what it prints
        self.process = subprocess.Popen(command, cwd=ROOT, env={**ENV, **(env or {})}, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not self.health(check=False).get("status") == "ok":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the server did not start: {self.output()[-3000:]}")
            time.sleep(0.2)

    def health(self, check: bool = True) -> dict:
        try:
            response = httpx.get(self.url + "/health", headers=self.headers, timeout=5)
        except httpx.TransportError:
            if check:
                raise
            return {}
        return response.json()

    def idle(self, timeout: float = 10) -> dict:
        """/health once no request runs or waits (rows are freed at the scheduler's next step)."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
                return health
            time.sleep(0.05)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kwargs)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=signal.SIGINT, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def server(tiny_dir, tokenizer_path):
    """One process, with an API key, and prompts prefilled in chunks of 16 tokens."""
    server = Server([sys.executable], tiny_dir / "gqa-mp1", tokenizer_path, "--max_seq_len", MAX_SEQ_LEN,
                    "--max_batch_size", MAX_BATCH, "--max_queue", MAX_QUEUE, "--prefill_chunk", 16,
                    "--api-key", KEY, "--allowed_origins", ALLOWED_ORIGIN, api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def torchrun_server(tiny_dir, tokenizer_path):
    """Two processes on the two-shard checkpoint: rank 0 serves, rank 1 follows its steps."""
    server = Server(TORCHRUN_2, tiny_dir / "gqa-mp2", tokenizer_path, "--max_seq_len", MAX_SEQ_LEN,
                    "--max_batch_size", MAX_BATCH, "--max_queue", MAX_QUEUE, "--prefill_chunk", 16)
    yield server
    server.stop()  # torchrun passes Ctrl-C on to both ranks: rank 0 shuts down and tells rank 1 to stop
    assert "a step failed" not in server.output()


@pytest.fixture(scope="module")
def reference(build):
    """The library's generator for the server's checkpoint: what each request should get."""
    return build("gqa", max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH)


# Requests of several lengths: a prompt longer than the prefill chunk, stop strings, a one-token answer.
PROMPTS = ["hello", "the capital of france is", "sea otter " * 12, "one two three", "the llama model"]
DIALOGS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the capital of france"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the river"},
     {"role": "user", "content": "and"}],
]


def sse_events(lines) -> list:
    """The data of each server-sent event; every one is JSON but the last, [DONE]."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


@SUBPROCESS
@pytest.mark.parametrize("prompt, max_tokens, stop", [
    (PROMPTS[0], 12, None), (PROMPTS[2], 20, None), (PROMPTS[1], 30, ["e "]), (PROMPTS[3], 1, None)])
def test_completions_are_the_librarys(server, reference, prompt, max_tokens, stop):
    """Greedy text, finish reason and usage, whole and streamed, are text_completion's for the same request."""
    expected = reference.text_completion([prompt], temperature=0, max_gen_len=max_tokens, stop=stop or ())[0]
    counts = list(reference.text_completion_stream([prompt], temperature=0, max_gen_len=max_tokens,
                                                   stop=stop or ()))[-1]
    client = server.client()
    whole = client.completions.create(model="gqa-mp1", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      stop=stop)
    assert whole.object == "text_completion" and whole.model == "gqa-mp1"
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected["generation"],
                                                                       expected["finish_reason"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (counts["prompt_tokens"],
                                                                          counts["completion_tokens"])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.completions.create(model="gqa-mp1", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stop=stop, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["generation"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish_reason"]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == counts["completion_tokens"]
    assert len({c.id for c in chunks}) == 1


@SUBPROCESS
@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_completions_are_the_librarys(server, reference, dialog):
    expected = reference.chat_completion([dialog], temperature=0, max_gen_len=16)[0]
    client = server.client()
    whole = client.chat.completions.create(model="gqa-mp1", messages=dialog, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected["generation"]["content"]
    assert whole.choices[0].finish_reason == expected["finish_reason"]

    chunks = list(client.chat.completions.create(model="gqa-mp1", messages=dialog, max_completion_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["generation"]["content"]
    assert chunks[-1].choices[0].finish_reason == expected["finish_reason"]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


@SUBPROCESS
def test_a_seed_gives_the_librarys_sample_whatever_runs_beside_it(server, reference):
    """Sampling with a seed draws from the request's own generator: alone in the library or among other requests
    on the server, the same text."""
    expected = reference.text_completion([PROMPTS[1]], temperature=0.9, top_p=0.95, max_gen_len=24, seed=7)[0]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
            body = {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 7}
            others = [{"prompt": p, "max_tokens": 24, "temperature": 1.0} for p in PROMPTS[2:]]
            responses = await asyncio.gather(*(client.post("/v1/completions", json=b)
                                               for b in [body, *others, body]))
            return [r.json() for r in responses]

    results = asyncio.run(run())
    assert results[0]["choices"][0]["text"] == results[-1]["choices"][0]["text"] == expected["generation"]


@SUBPROCESS
def test_logprobs_are_the_librarys(server, reference):
    expected = reference.text_completion([PROMPTS[1]], temperature=0, max_gen_len=8, logprobs=True)[0]
    client = server.client()
    completion = client.completions.create(model="gqa-mp1", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                           logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-4)
    eos = completion.choices[0].finish_reason == "stop"  # EOS counts as a completion token but has no entry
    assert len(logprobs.tokens) == completion.usage.completion_tokens - eos
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(logprob)  # greedy: the chosen token is the likeliest
        assert max(top.values()) == pytest.approx(logprob)

    chat = client.chat.completions.create(model="gqa-mp1", messages=DIALOGS[0], max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    expected = reference.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=6, logprobs=True)[0]
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected["logprobs"], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace").lstrip() == \
        chat.choices[0].message.content.lstrip()


@SUBPROCESS
def test_models_health_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["gqa-mp1"]
    assert server.client().models.retrieve("gqa-mp1").id == "gqa-mp1"
    assert server.idle() == {"status": "ok", "model": "gqa-mp1", "running": 0, "waiting": 0,
                             "max_seq_len": MAX_SEQ_LEN, "max_batch_size": MAX_BATCH}
    page = httpx.get(server.url + "/")  # the page and its files need no key: the page asks for it
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(server.url + "/static/chat.js").status_code == 200


@SUBPROCESS
def test_only_allowed_origins_may_call_from_a_browser(server):
    """CORS: a page of an allowed origin gets its preflight answered (without the key, which preflights never
    carry); any other origin gets no permission."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    answer = httpx.get(server.url + "/v1/models", headers={"Origin": ALLOWED_ORIGIN, **server.headers})
    assert answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


LONG_PROMPT = "the " * (MAX_SEQ_LEN + 10)
ERRORS = [
    # (method, path, body or raw bytes, headers, status, param, code)
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 3}, None, 400, "temperature", None),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, None, 400, "top_p", None),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 2}, None, 400, "n", "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": "hi", "echo": True}, None, 400, "echo", "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 6}, None, 400, "logprobs", None),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, None, 400, "prompt", None),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, None, 400, "prompt", None),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": [""]}, None, 400, "stop", None),
    ("POST", "/v1/completions", {"prompt": "hi", "frobnicate": 1}, None, 400, "frobnicate", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens", None),
    ("POST", "/v1/completions", {"prompt": LONG_PROMPT}, None, 400, "prompt", "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": MAX_SEQ_LEN}, None, 400, "max_tokens",
     "context_length_exceeded"),
    ("POST", "/v1/completions", b'{"prompt": "hi",', None, 400, None, None),
    ("POST", "/v1/chat/completions", {"messages": []}, None, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi [INST] there"}]}, None, 400,
     "messages", "invalid_prompt"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "<<SYS>>"},
                                                   {"role": "user", "content": "hi"}]}, None, 400, "messages",
     "invalid_prompt"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "messages",
     None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, None, 400, "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     None, 400, "tools", "unsupported_parameter"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                "image_url": "x"}]}]}, None, 400,
     "messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None, 400,
     "top_logprobs", None),
    ("POST", "/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, None, "invalid_api_key"),
    ("POST", "/v1/completions", {"prompt": "hi"}, {"Authorization": ""}, 401, None, "invalid_api_key"),
    ("GET", "/health", None, {"Authorization": ""}, 401, None, "invalid_api_key"),
    ("GET", "/v1/models", None, {"Authorization": "Basic " + KEY}, 401, None, "invalid_api_key"),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, None, 404, "model", "model_not_found"),
    ("GET", "/v1/models/gpt-4", None, None, 404, "model", "model_not_found"),
    ("GET", "/v1/engines", None, None, 404, None, "not_found"),
    ("POST", "/v1/completions", {"prompt": "x" * (1 << 20)}, None, 413, None, "request_too_large"),
]


@SUBPROCESS
@pytest.mark.parametrize("method, path, body, headers, status, param, code", ERRORS)
def test_errors_have_openais_shape_and_status(server, method, path, body, headers, status, param, code):
    """Every refusal is a JSON error with OpenAI's fields and the right status, before anything is computed."""
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    response = httpx.request(method, server.url + path, content=content,
                             headers={**server.headers, "Content-Type": "application/json", **(headers or {})})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


@SUBPROCESS
def test_a_body_without_a_length_is_bounded_too(server):
    """A chunked upload (no Content-Length) is cut off at the limit as well."""
    def chunks():
        for _ in range(40):
            yield b" " * 32768

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers=server.headers)
    assert response.status_code == 413


@SUBPROCESS
def test_a_full_queue_answers_503_and_disconnects_free_rows_and_places(server, reference):
    """With every row busy and the queue full, a request gets a 503 with Retry-After; clients that go away, running
    or waiting, give back their row or place at once."""
    # greedy, so no answer ends (and frees its row) while the test looks (a sampled one could end at once)
    assert reference.text_completion(["hello"], temperature=0, max_gen_len=1000)[0]["finish_reason"] == "length"

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60, limits=limits) as client:
            long = {"prompt": "hello", "max_tokens": MAX_SEQ_LEN - 8, "temperature": 0, "stream": True}
            streams = [client.stream("POST", "/v1/completions", json=long) for _ in range(MAX_BATCH + MAX_QUEUE)]
            responses = await asyncio.gather(*(s.__aenter__() for s in streams))
            assert all(r.status_code == 200 for r in responses)
            deadline = time.monotonic() + 10
            while server.health()["running"] < MAX_BATCH and time.monotonic() < deadline:  # admitted at the next step
                await asyncio.sleep(0.05)
            health = server.health()
            assert (health["running"], health["waiting"]) == (MAX_BATCH, MAX_QUEUE)
            refused = await client.post("/v1/completions", json={"prompt": "hi"})
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "server_busy"
            for stream in streams:
                await stream.__aexit__(None, None, None)

    asyncio.run(run())
    assert server.idle(timeout=10)["running"] == 0 and server.health()["waiting"] == 0


@SUBPROCESS
def test_rows_are_freed_when_clients_disconnect_mid_answer(server, reference):
    # greedy, so the answer is known to run on well past the lines read (a sampled one could end at once)
    assert reference.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=64)[0]["finish_reason"] == "length"
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers, timeout=60,
                      json={"messages": DIALOGS[0], "max_tokens": MAX_SEQ_LEN // 2, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.health()["running"] == 1
    assert server.idle(timeout=5)["running"] == 0


def load_requests(reference) -> list:
    """Distinct greedy requests, each with the text the library gives it alone: (path, body, text, finish)."""
    requests = []
    for i, prompt in enumerate(PROMPTS):
        stop = ["e "] if i == 1 else ()
        for max_tokens in (1, 9, 24):
            result = reference.text_completion([prompt], temperature=0, max_gen_len=max_tokens, stop=stop)[0]
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": list(stop) or None}
            requests.append(("/v1/completions", body, result["generation"], result["finish_reason"]))
    for dialog in DIALOGS:
        result = reference.chat_completion([dialog], temperature=0, max_gen_len=12)[0]
        body = {"messages": dialog, "max_tokens": 12, "temperature": 0}
        requests.append(("/v1/chat/completions", body, result["generation"]["content"], result["finish_reason"]))
    return requests


async def load(server, requests, n_clients: int, n_requests: int, seed: int = 0) -> dict:
    """n_clients send n_requests between them, each a random one of `requests`, some streamed, some dropped after a
    chunk or two; every answer read to the end must be well-formed and the library's."""
    rng = random.Random(seed)
    plan = [(rng.choice(requests), rng.choice(["whole", "stream", "stream", "drop"])) for _ in range(n_requests)]
    counts = {"whole": 0, "stream": 0, "drop": 0, "busy": 0}

    async def send(client, request, mode):
        path, body, text, finish = request
        chat = path.endswith("chat/completions")
        while True:
            async with client.stream("POST", path, json={**body, "stream": mode != "whole"}) as response:
                if response.status_code == 503:  # the queue was full for a moment (a dropped request's place is
                    # given back at the next step): retry, sooner than Retry-After says, to keep the test short
                    counts["busy"] += 1
                    await asyncio.sleep(0.1)
                    continue
                assert response.status_code == 200, await response.aread()
                if mode == "whole":
                    answer = json.loads(await response.aread())
                    choice = answer["choices"][0]
                    assert (choice["message"]["content"] if chat else choice["text"]) == text
                    assert choice["finish_reason"] == finish and answer["usage"]["completion_tokens"] >= 1
                elif mode == "drop":
                    await response.aiter_lines().__anext__()
                else:
                    chunks = sse_events([line async for line in response.aiter_lines()])
                    pieces = [c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
                              for c in chunks]
                    assert "".join(pieces) == text and chunks[-1]["choices"][0]["finish_reason"] == finish
                counts[mode] += 1
                return

    async def client_loop(client, share):
        for request, mode in share:
            await send(client, request, mode)

    limits = httpx.Limits(max_connections=n_clients)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, plan[i::n_clients]) for i in range(n_clients)))
    return counts


@SUBPROCESS
@pytest.mark.parametrize("which, n_requests", [("server", 200), ("torchrun_server", 64)])
def test_32_clients_get_the_librarys_answers_and_leave_nothing_held(request, reference, which, n_requests):
    """32 concurrent clients, mixed lengths, streamed or not, some dropping out mid-answer: the server stays up,
    every answer read to its end is the one the request gets alone, and afterwards no row is held and nothing
    waits. With two processes too."""
    server = request.getfixturevalue(which)
    counts = asyncio.run(load(server, load_requests(reference), n_clients=32, n_requests=n_requests))
    assert counts["whole"] and counts["stream"] and counts["drop"]
    health = server.idle()
    assert (health["status"], health["running"], health["waiting"]) == ("ok", 0, 0)


@SUBPROCESS
def test_under_torchrun_the_answers_are_the_one_process_librarys(torchrun_server, reference):
    expected = reference.text_completion([PROMPTS[2]], temperature=0, max_gen_len=20)[0]
    completion = torchrun_server.client().completions.create(model="gqa-mp2", prompt=PROMPTS[2], max_tokens=20,
                                                             temperature=0)
    assert completion.choices[0].text == expected["generation"]
    chat = list(torchrun_server.client().chat.completions.create(model="gqa-mp2", messages=DIALOGS[1], max_tokens=10,
                                                                 temperature=0, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chat)
    assert content == reference.chat_completion([DIALOGS[1]], temperature=0, max_gen_len=10)[0]["generation"]["content"]


@SUBPROCESS
def test_ctrl_c_ends_answers_and_exits_cleanly(tiny_dir, tokenizer_path):
    """The key from $LLAMA_API_KEY; Ctrl-C mid-answer: the stream ends with an error event and [DONE], and the server
    exits with status 0 and no traceback."""
    server = Server([sys.executable], tiny_dir / "gqa-mp1", tokenizer_path, "--max_seq_len", MAX_SEQ_LEN,
                    env={"LLAMA_API_KEY": "from-env"}, api_key="from-env")
    try:
        assert httpx.get(server.url + "/health").status_code == 401
        with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                          json={"prompt": "hello", "max_tokens": MAX_SEQ_LEN - 8, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGINT)
            events = sse_events([line for line in lines])
        assert events[-1]["error"]["code"] == "shutting_down"
        assert server.process.wait(30) == 0
        assert "Traceback" not in server.output()
    finally:
        if server.process.poll() is None:
            server.process.kill()


@SUBPROCESS
def test_a_checkpoint_that_cannot_load_stops_the_server_with_its_error(tmp_path, tokenizer_path):
    process = subprocess.run([sys.executable, "-m", "llama.serve", "--ckpt_dir", str(tmp_path), "--tokenizer_path",
                              str(tokenizer_path), "--port", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 1 and process.stderr.splitlines()[-1].startswith(
        f"error: no params.json (Meta format) or config.json (Hugging Face format) in {tmp_path}"), process.stderr


@pytest.fixture(scope="module")
def scheduled(build):
    """A scheduler over its own model (3 rows), prompts prefilled 8 tokens at a time."""
    generator = build("gqa", max_seq_len=256, max_batch_size=3, seed=2)
    scheduler = Scheduler(lambda: generator, max_queue=16, prefill_tokens=8).start()
    while scheduler.state == "loading":
        time.sleep(0.01)
    yield scheduler
    scheduler.close()
    scheduler.thread.join()


def test_requests_joining_and_leaving_the_batch_get_their_tokens_alone(scheduled, build):
    """Greedy, fp32: each request's token ids are exactly `generate`'s for it alone, though requests join the running
    batch at every step, queue for rows, and have their prompts prefilled in chunks between decode steps."""
    generator = scheduled.llama
    tok = generator.tokenizer
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS + ["sea otter " * 20, "a"]]
    lengths = [20, 5, 30, 12, 40, 25, 3]
    expected = [generator.generate([p], n, temperature=0)[0][0] for p, n in zip(prompts, lengths)]  # before any job
    events = queue.Queue()  # every job's events in the order the worker made them
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        scheduled.submit(Job(prompt, n, lambda e, i=i: events.put((i, e)), temperature=0))
        time.sleep(0.003 * i)  # some join mid-answer, some wait for a row
    ids, order = [[] for _ in prompts], []
    while len(order) < len(prompts):
        i, event = events.get(timeout=60)
        if isinstance(event, Token):
            ids[i].append(event.id)
        elif isinstance(event, Finish):
            order.append(i)
    assert ids == expected
    assert scheduled.running == 0 and scheduled.queued == 0


def test_a_long_prompt_is_prefilled_between_decode_steps(scheduled):
    """While a 200-token prompt is prefilled (8 tokens per step), the running request keeps getting tokens."""
    tok = scheduled.llama.tokenizer
    events = queue.Queue()
    scheduled.submit(Job(tok.encode("hello", bos=True, eos=False), 60, lambda e: events.put(("short", e)),
                         temperature=0))
    assert isinstance(events.get(timeout=30)[1], Token)  # running
    long_prompt = [1] + [3 + i % 400 for i in range(199)]
    scheduled.submit(Job(long_prompt, 4, lambda e: events.put(("long", e)), temperature=0))
    tokens_before_long_starts, finished = None, 0
    count = 0
    while finished < 2:
        name, event = events.get(timeout=30)
        if name == "long" and tokens_before_long_starts is None:
            tokens_before_long_starts = count
        count += name == "short"
        finished += not isinstance(event, Token)
    assert tokens_before_long_starts >= 10  # 25 prefill steps, each with a decode step


def test_a_cancelled_request_frees_its_row_at_the_next_step(scheduled):
    tok = scheduled.llama.tokenizer
    events = queue.Queue()
    job = Job(tok.encode("hello", bos=True, eos=False), 200, events.put, temperature=0)
    scheduled.submit(job)
    events.get(timeout=30)
    scheduled.cancel(job)
    deadline = time.monotonic() + 5
    while scheduled.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduled.running == 0 and scheduled.queued == 0


@SUBPROCESS
def test_a_llama3_checkpoint_is_served_in_its_own_chat_format(tmp_path):
    """A tiny Llama 3.2-style checkpoint: the chat endpoint uses the Llama 3 format and stop tokens (its answer is
    chat_completion's), and Llama 2's tags in a message are text, not refused."""
    from llama import Llama
    from llama.tiny import main as tiny_main

    tiny_main(str(tmp_path), config="llama3.2")
    ckpt = tmp_path / "llama3.2"
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello [INST] there"}]
    expected = Llama.build(str(ckpt), None, 128, 1, device="cpu", dtype="fp32").chat_completion(
        [messages], temperature=0, max_gen_len=12)[0]
    server = Server([sys.executable], ckpt, ckpt / "tokenizer.model", "--max_seq_len", 128, "--max_batch_size", 2)
    try:
        answer = server.client().chat.completions.create(model="llama3.2", messages=messages, temperature=0,
                                                         max_tokens=12)
    finally:
        server.stop()
    assert answer.choices[0].message.content == expected["generation"]["content"]
    assert answer.choices[0].finish_reason == expected["finish_reason"]
