"""Serving throughput and latency: N concurrent streaming clients against `python -m llama.serve`, next to the
same requests one at a time (N = 1) and to the engine's own batch-8 `generate`, in one run.

    python benchmarks/bench_serve.py --shape 1.1b [--clients 1,4,8,16] [--threads 2] [--json out.json]
    python benchmarks/bench_serve.py --ckpt_dir llama-2-7b-chat --tokenizer_path tokenizer.model --device cuda

Each client sends `requests` streamed completions one after another, each a distinct PROMPT_LEN-token prompt
continued greedily for max_tokens tokens (logprobs on, so every token is its own chunk and is timed). Reported per
N: aggregate generated tokens/s over the wall time, time to first token and time between tokens (p50, p99). The
engine's batch-8 figure is `Llama.generate` on 8 such prompts in this process, before the server starts, so the
two never share the cores. Random weights are used for named shapes (their text is noise; the work is real).
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import fire
import httpx
import torch

from bench_generate import named_checkpoint

PROMPT_LEN = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt(i: int) -> List[int]:
    """The i-th distinct prompt: BOS and PROMPT_LEN - 1 ordinary token ids."""
    return [1] + [3 + (7 * i + 13 * j) % 1000 for j in range(PROMPT_LEN - 1)]


def percentile(values: List[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def engine_batch8(ckpt_dir, tokenizer_path, device, dtype, max_tokens: int) -> float:
    """Generated tokens/s of Llama.generate on 8 prompts at once (best of two, after a warm-up)."""
    from llama import Llama

    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=PROMPT_LEN + max_tokens + 8, max_batch_size=8,
                            device=device, dtype=dtype)
    prompts = [prompt(i) for i in range(8)]
    generator.generate(prompts, max_gen_len=4, temperature=0)  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        tokens, _ = generator.generate(prompts, max_gen_len=max_tokens, temperature=0)
        best = max(best, sum(map(len, tokens)) / (time.perf_counter() - start))
    return best


async def run_clients(url: str, n_clients: int, requests: int, max_tokens: int) -> dict:
    """n_clients stream `requests` completions each; their aggregate tokens/s and latencies."""
    first_token, between, tokens = [], [], 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "logprobs": 0, "stream": True}
        last, first = time.perf_counter(), True
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if json.loads(line[len("data: "):])["choices"][0]["logprobs"] is None:  # the finish chunk
                    continue
                now = time.perf_counter()
                (first_token if first else between).append(now - last)
                last, first = now, False
                tokens += 1

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        for r in range(requests):
            await one(client, c * requests + r)

    limits = httpx.Limits(max_connections=n_clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, c) for c in range(n_clients)))
        wall = time.perf_counter() - start
    return {"clients": n_clients, "tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ttft_p50_ms": 1e3 * percentile(first_token, 50), "ttft_p99_ms": 1e3 * percentile(first_token, 99),
            "tbt_p50_ms": 1e3 * percentile(between, 50), "tbt_p99_ms": 1e3 * percentile(between, 99)}


def start_server(ckpt_dir, tokenizer_path, device, dtype, max_batch_size: int, max_tokens: int, threads: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llama.serve", "--ckpt_dir", ckpt_dir, "--tokenizer_path", tokenizer_path,
               "--dtype", dtype, "--port", str(port), "--max_batch_size", str(max_batch_size), "--max_seq_len",
               str(PROMPT_LEN + max_tokens + 8), "--log_level", "warning"] + (["--device", device] if device else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url + "/health").json().get("status") == "ok":
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def main(
    shape: str = "1.1b",
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    clients: str = "1,4,8,16",
    requests: int = 2,
    max_tokens: int = 64,
    device: Optional[str] = None,
    dtype: str = "bf16",
    threads: int = 2,
    work_dir: str = os.path.join(tempfile.gettempdir(), "llama-bench"),
    json_path: Optional[str] = None,
):
    """Benchmark a named random shape (134m, 1.1b, 7b) or a real --ckpt_dir; `requests` per client."""
    counts = [int(c) for c in (clients.split(",") if isinstance(clients, str) else clients)]
    torch.set_num_threads(threads)
    if ckpt_dir is None:
        ckpt_dir, tokenizer_path = named_checkpoint(shape, dtype, work_dir)
    tokenizer_path = tokenizer_path or os.path.join(ckpt_dir, "tokenizer.model")

    engine = engine_batch8(ckpt_dir, tokenizer_path, device, dtype, max_tokens)
    process, url = start_server(ckpt_dir, tokenizer_path, device, dtype, max(counts), max_tokens, threads)
    try:
        asyncio.run(run_clients(url, 1, 1, 4))  # warm-up
        results = [asyncio.run(run_clients(url, n, requests, max_tokens)) for n in counts]
    finally:
        process.terminate()
        process.wait()

    print(f"\n{ckpt_dir}, {dtype}, {threads} threads; {PROMPT_LEN}-token prompts, {max_tokens} tokens each, "
          f"{requests} requests per client. Engine batch-8 generate: {engine:.1f} tok/s")
    print(f"{'clients':>8}{'tok/s':>9}{'x one':>7}{'% b8':>7}{'TTFT p50':>10}{'p99':>8}{'TBT p50':>9}{'p99':>8} (ms)")
    one = next((r["tok_s"] for r in results if r["clients"] == 1), None)
    for r in results:
        ratio = f"{r['tok_s'] / one:>7.2f}" if one else f"{'':>7}"
        print(f"{r['clients']:>8}{r['tok_s']:>9.1f}{ratio}{100 * r['tok_s'] / engine:>6.0f}%{r['ttft_p50_ms']:>10.0f}"
              f"{r['ttft_p99_ms']:>8.0f}{r['tbt_p50_ms']:>9.1f}{r['tbt_p99_ms']:>8.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"ckpt_dir": ckpt_dir, "dtype": dtype, "threads": threads, "max_tokens": max_tokens,
                       "engine_batch8_tok_s": engine, "results": results}, f, indent=2)


if __name__ == "__main__":
    fire.Fire(main)
