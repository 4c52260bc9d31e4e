"""Decode speed while another process keeps one core busy, and on an idle machine: CPU threads fixed at one per
core (what every run did before the thread tuner), fixed at one, and tuned (the default), each as a ratio of the
one-thread speed measured in the same condition of the same run.

    python benchmarks/bench_threads.py [--shape 1.1b] [--dtype bf16] [--quantize int8] [--tokens 128]

The busy process is a Python busy loop pinned to the last core. Each figure is its own subprocess, and the whole
run should be on an otherwise idle machine.
"""

import os
import subprocess
import sys
import time
from typing import Optional

import fire
import torch

from bench_generate import named_checkpoint

from llama import Llama

PROMPT = [1, 450, 4996, 17354, 1701, 432]


def decode(ckpt_dir: str, tokenizer_path: str, threads: Optional[int], tokens: int, quantize: Optional[str]) -> None:
    """Subprocess entry: print the batch-1 greedy decode rate, in tokens/s."""
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=len(PROMPT) + tokens + 8, max_batch_size=1,
                            device="cpu", quantize=quantize, threads=threads)
    generator.generate([PROMPT], max_gen_len=8, temperature=0)  # warm
    start = time.perf_counter()
    generator.generate([PROMPT], max_gen_len=tokens + 1, temperature=0)
    middle = time.perf_counter()
    generator.generate([PROMPT], max_gen_len=1, temperature=0)  # the prefill and first token, taken out
    print(f"RATE {tokens / ((middle - start) - (time.perf_counter() - middle)):.3f}")


def rate(ckpt_dir: str, tokenizer_path: str, threads: Optional[int], tokens: int, quantize: Optional[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, os.path.abspath(__file__), "decode", ckpt_dir, tokenizer_path,
           "--threads", str(threads), "--tokens", str(tokens), "--quantize", str(quantize)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("RATE ")).split()[1])


def main(shape: str = "1.1b", dtype: str = "bf16", quantize: Optional[str] = None, tokens: int = 128,
         work_dir: str = "/tmp/llama-bench") -> None:
    ckpt_dir, tokenizer_path = named_checkpoint(shape, dtype, work_dir)
    cores = torch.get_num_threads()
    rows = {f"fixed {cores} (before)": cores, "fixed 1": 1, "tuned (default)": None}
    print(f"{shape} {quantize or dtype}, batch-1 decode of {tokens} tokens, {cores} cores")
    print(f"{'condition':<22}{'threads':<20}{'tok/s':>8}{'x one thread':>14}")
    for condition in ("idle", "one core busy"):
        busy = None
        if condition != "idle":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            os.sched_setaffinity(busy.pid, {max(os.sched_getaffinity(0))})
        try:
            rates = {label: rate(ckpt_dir, tokenizer_path, threads, tokens, quantize) for label, threads in rows.items()}
        finally:
            if busy is not None:
                busy.kill()
        for label, r in rates.items():
            print(f"{condition:<22}{label:<20}{r:>8.2f}{r / rates['fixed 1']:>14.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["decode"]:  # one measurement, in a process of its own
        fire.Fire(decode, command=sys.argv[2:])
    else:
        fire.Fire(main)
