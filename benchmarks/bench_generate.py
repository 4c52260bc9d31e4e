"""Generation speed against the memory-bandwidth ceiling, for our generator and for HF transformers.

    python benchmarks/bench_generate.py --shape 1.1b [--engines ours,hf] [--threads 2] [--json out.json]
    python benchmarks/bench_generate.py --ckpt_dir llama-2-7b --tokenizer_path tokenizer.model

At batch 1 every generated token streams every weight once (all but the embedding, of which one row is read),
so decode tokens/s <= read bandwidth / bytes of those weights. The bandwidth is measured on the same device at the
start of the run and again in each engine's process before it loads its model (a shared VM's bandwidth drifts by
10-20% over minutes), and each row's ceiling uses its own measurement. Each engine runs in a fresh subprocess so
load time and peak resident memory are its own. Random weights are used for named shapes; greedy decoding is forced to run every step. Prefill is a 512-token
prompt's forward with the last token's logits only (as generation, transformers' generate and llama.cpp compute it).
Decode speed excludes the prompt: it is timed as generating max_gen_len + 1 tokens minus generating 1.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Optional, Tuple

import fire
import torch

from llama.config import DTYPES
from llama.tiny import make_checkpoint, train_tokenizer

SHAPES = {
    "134m": {"dim": 768, "n_layers": 12, "n_heads": 12, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1},
    "1.1b": {"dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "multiple_of": 256, "norm_eps": 1e-5,
             "vocab_size": -1},
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1},
    "tiny": {"dim": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 128, "vocab_size": -1},  # plumbing
}
VOCAB = 32000  # of the named shapes' tokenizer
PREFILL_LEN = 512
PROMPT_LEN = 16


def read_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Best bytes/s over a few read-only reductions of a buffer much larger than any cache (256 MB: small enough
    that an engine's peak memory, measured after, is its model's)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = 0.0
    for reduce in (torch.sum, torch.amax) * 3:
        reduce(buf)
        sync(device)
        start = time.perf_counter()
        reduce(buf)
        sync(device)
        best = max(best, nbytes / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def streamed_bytes(ckpt_dir: str, dtype: torch.dtype) -> int:
    """Bytes of weights read per decode step at batch 1 in `dtype`: everything but the embedding table."""
    from llama.formats.base import load_shard
    from llama.formats.meta import find_shards

    numel = sum(t.numel() for path in find_shards(ckpt_dir) for k, t in load_shard(path).items()
                if k not in ("tok_embeddings.weight", "rope.freqs"))
    return numel * dtype.itemsize


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / 1e9


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(prefill, generate, device, max_gen_len: int) -> dict:
    """Best of two timed runs (after a warm-up) of prefill() and of decoding at batch 1 and 8. generate(batch, n)
    returns a callable that generates n tokens after a PROMPT_LEN-token prompt; decoding speed is the difference
    between n = max_gen_len + 1 and n = 1, so the prompt's prefill and the first token it yields are not counted."""
    prefill()  # warm-up (first touch of weights, kernel selection)
    result = {"prefill_tok_s": PREFILL_LEN / min(timed(prefill, device) for _ in range(2))}
    # the first generation at batch 1 includes any compilation: what a user waits for before the first tokens
    result["first_generate_s"] = timed(generate(1, max_gen_len + 1), device)
    for batch in (1, 8):
        generate(batch, max_gen_len + 1)()
        full = min(timed(generate(batch, max_gen_len + 1), device) for _ in range(2))
        first = min(timed(generate(batch, 1), device) for _ in range(2))
        result[f"decode_b{batch}_tok_s"] = batch * max_gen_len / (full - first)
    result["peak_rss_gb"] = peak_rss_gb()
    if device.type == "cuda":
        result["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["syncs_in_64_steps"] = host_syncs(generate(1, 65))
    return result


def host_syncs(run) -> int:
    """How many times run() makes the host wait for the device (PyTorch's sync debug mode warns once for each):
    a decode loop should need none per token, only its periodic check of which rows are done."""
    run()  # warm: compilation and CUDA-graph capture synchronise too
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_ours(ckpt_dir, tokenizer_path, device, dtype, max_gen_len, **build_kwargs) -> dict:
    from llama import Llama

    start = time.perf_counter()
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=PREFILL_LEN + 8, max_batch_size=8,
                            device=device, dtype=dtype, **build_kwargs)
    load_s = time.perf_counter() - start
    dev = generator.model.tok_embeddings.weight.device
    # Random weights may pick EOS; stop the generator from seeing one so every run takes all its steps.
    generator.tokenizer.eos_id = -2

    vocab = generator.model.params.vocab_size

    def prefill():
        with torch.inference_mode():
            tokens = torch.randint(3, vocab, (1, PREFILL_LEN), device=dev)
            generator.model.forward(tokens, 0, logits_at=torch.tensor([PREFILL_LEN - 1], device=dev))

    def generate(batch, n):
        prompts = [[1] + [3 + (7 * i + j) % 1000 for j in range(PROMPT_LEN - 1)] for i in range(batch)]
        return lambda: generator.generate(prompts, max_gen_len=n, temperature=0)

    # what one decode step at batch 1 streams: every weight (packed or quantized, as held) but the embedding
    tensors = [t for name, t in [*generator.model.named_parameters(), *generator.model.named_buffers()]
               if not name.startswith("tok_embeddings") and ".cache." not in name]
    streamed = sum(t.nbytes for t in tensors)
    return {"load_s": load_s, "streamed_bytes": streamed, **measure(prefill, generate, dev, max_gen_len)}


def run_hf(ckpt_dir, tokenizer_path, device, dtype, max_gen_len) -> dict:
    import transformers

    from llama.formats import open_checkpoint
    from llama.formats.hf import meta_to_hf_model

    start = time.perf_counter()
    model = meta_to_hf_model(open_checkpoint(ckpt_dir), dtype=dtype, device=device)
    load_s = time.perf_counter() - start
    dev = model.device

    vocab = model.config.vocab_size

    def prefill():
        with torch.inference_mode():
            model(torch.randint(3, vocab, (1, PREFILL_LEN), device=dev), logits_to_keep=1)

    def generate(batch, n):
        ids = torch.randint(3, vocab, (batch, PROMPT_LEN), device=dev)
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return lambda: model.generate(ids, **kwargs)

    transformers.logging.set_verbosity_error()
    return {"load_s": load_s, **measure(prefill, generate, dev, max_gen_len)}


ENGINES = {"ours": run_ours, "hf": run_hf}


def engine(name: str, ckpt_dir: str, tokenizer_path: str, device: str, dtype: str, max_gen_len: int,
           threads: int, build_kwargs: str = "{}") -> None:
    """Subprocess entry: run one engine and print its figures as one JSON line."""
    torch.set_num_threads(threads)
    dt = DTYPES[dtype]
    kwargs = build_kwargs if isinstance(build_kwargs, dict) else json.loads(build_kwargs)  # fire may pre-parse
    run = ENGINES[name]
    bandwidth = read_bandwidth(torch.device(device))
    result = run(ckpt_dir, tokenizer_path, device, dtype if name == "ours" else dt, max_gen_len, **kwargs)
    result["bandwidth_gb_s"] = bandwidth / 1e9
    print("RESULT " + json.dumps(result))


def named_checkpoint(shape: str, dtype: str, work_dir: str) -> Tuple[str, str]:
    """(checkpoint dir, tokenizer path) of a random checkpoint of a named shape, written to work_dir once."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)} or pass --ckpt_dir")
    ckpt_dir = os.path.join(work_dir, f"{shape}-{dtype}")
    tokenizer_path = os.path.join(work_dir, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        os.makedirs(work_dir, exist_ok=True)
        train_tokenizer(tokenizer_path, vocab_size=VOCAB)
    if not os.path.exists(ckpt_dir):
        print(f"writing a random {shape} checkpoint to {ckpt_dir} ...", flush=True)
        make_checkpoint(ckpt_dir, SHAPES[shape], VOCAB, dtype=DTYPES[dtype])
    return ckpt_dir, tokenizer_path


def main(
    shape: str = "1.1b",
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    engines: str = "ours,hf",
    device: Optional[str] = None,
    dtype: str = "bf16",
    threads: int = 2,
    max_gen_len: int = 32,
    work_dir: str = os.path.join(tempfile.gettempdir(), "llama-bench"),
    json_path: Optional[str] = None,
    quantize: Optional[str] = None,
    variants: str = "{}",
):
    """Benchmark a named random shape (134m, 1.1b, 7b) or a real --ckpt_dir. --quantize int8|int4 adds a row for
    that mode; `variants` maps more row names to Llama.build keyword arguments as JSON, e.g.
    '{"ours int4/64": {"quantize": "int4", "group_size": 64}}'."""
    names = engines.split(",") if isinstance(engines, str) else engines  # fire parses "ours,hf" as a tuple
    unknown = sorted(set(names) - set(ENGINES))
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {sorted(ENGINES)}")
    torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ckpt_dir is None:
        ckpt_dir, tokenizer_path = named_checkpoint(shape, dtype, work_dir)
    tokenizer_path = tokenizer_path or os.path.join(ckpt_dir, "tokenizer.model")
    torch_dtype = DTYPES[dtype]
    bandwidth = read_bandwidth(dev)
    weight_bytes = streamed_bytes(ckpt_dir, torch_dtype)
    ceiling = bandwidth / weight_bytes

    rows = {name: (name, {}) for name in names}
    variants = variants if isinstance(variants, dict) else json.loads(variants)  # fire may pre-parse JSON
    if quantize:
        variants = {f"ours {quantize}": {"quantize": quantize}, **variants}
    rows.update({label: ("ours", kwargs) for label, kwargs in variants.items()})
    results = {}
    for label, (name, kwargs) in rows.items():
        cmd = [sys.executable, os.path.abspath(__file__), "engine", name, ckpt_dir, tokenizer_path, str(dev), dtype,
               str(max_gen_len), str(threads), json.dumps(kwargs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            continue
        results[label] = json.loads(lines[-1][len("RESULT "):])

    print(f"\n{shape if ckpt_dir.startswith(work_dir) else ckpt_dir}, {dtype}, device {dev}, {threads} threads; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s at the start; {weight_bytes / 1e9:.2f} GB of {dtype} weights "
          f"streamed per token: ceiling {ceiling:.1f} tok/s at batch 1. Each row's ceiling: its bytes per token at the "
          "bandwidth measured in its own process")
    print(f"{'engine':<14}{'load s':>7}{'1st gen s':>10}{'prefill tok/s':>14}{'GB/token':>9}{'GB/s':>6}{'ceiling':>8}"
          f"{'decode b1':>10}{'% ceiling':>10}{'decode b8':>10}{'peak RSS GB':>12}")
    for label, r in results.items():
        streamed = r.get("streamed_bytes", weight_bytes)
        r["ceiling_tok_s"] = r["bandwidth_gb_s"] * 1e9 / streamed
        print(f"{label:<14}{r['load_s']:>7.1f}{r['first_generate_s']:>10.1f}{r['prefill_tok_s']:>14.1f}"
              f"{streamed / 1e9:>9.2f}{r['bandwidth_gb_s']:>6.1f}{r['ceiling_tok_s']:>8.1f}{r['decode_b1_tok_s']:>10.2f}"
              f"{100 * r['decode_b1_tok_s'] / r['ceiling_tok_s']:>9.0f}%{r['decode_b8_tok_s']:>10.1f}"
              f"{r['peak_rss_gb']:>12.2f}")
    for label, r in results.items():
        if "peak_device_gb" in r:
            print(f"{label}: peak {dev.type} memory {r['peak_device_gb']:.2f} GB; the host waited for the device "
                  f"{r['syncs_in_64_steps']} times in 64 decode steps at batch 1")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"shape": shape, "dtype": dtype, "device": str(dev), "threads": threads,
                       "bandwidth_gb_s": bandwidth / 1e9, "streamed_gb": weight_bytes / 1e9,
                       "ceiling_tok_s": ceiling, "results": results}, f, indent=2)


if __name__ == "__main__":
    # `engine ...` is how main runs each engine in its own process; anything else is the user's command line.
    fire.Fire({"engine": engine} if sys.argv[1:2] == ["engine"] else main)
