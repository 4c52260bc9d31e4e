"""Load time and peak host memory of Llama.build (and of the converter) for a checkpoint of over 1 GB.

    python benchmarks/bench_load.py [--n_layers 12] [--work_dir DIR]

Writes a random Meta-format checkpoint (dim 2048, bf16, about 1.1 GB with 12 layers) as 1 shard, reshards it to 2,
then runs each case in a fresh process (under torchrun for 2 processes) and prints, per rank: seconds for
Llama.build and then for reading every weight once (memory-mapped weights are read from disk on first use, so this
is part of the cost), resident memory (RSS) before and after, peak RSS, and the bytes of weights the rank keeps.
RSS counts the pages of memory-mapped checkpoint files that were read ("file", page cache the kernel can reclaim)
as well as private memory ("anon"). Peak RSS is VmHWM: ru_maxrss would also count the parent's RSS, which a child
inherits across fork and exec on Linux. The files are in the page cache (just written), so times are for a warm
cache. Linux only (/proc/self/status).
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import fire
import torch

from llama.tiny import make_checkpoint, train_tokenizer

PARAMS = {"dim": 2048, "n_heads": 16, "n_kv_heads": 4, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}
VOCAB = 512  # the tiny tokenizer's: the embedding is a negligible part of the checkpoint
# label -> (checkpoint, processes, dtype); "convert ..." rows run the converter instead of Llama.build
CASES = {
    "1 shard, 1 process, bf16": ("mp1", 1, "bf16"),  # no copy: the weights stay memory-mapped
    "2 shards, 1 process, bf16": ("mp2", 1, "bf16"),  # merged: copied, one shard mapped at a time
    "1 shard, 1 process, fp32": ("mp1", 1, "fp32"),  # converted while copying
    "1 shard, 2 processes, bf16": ("mp1", 2, "bf16"),  # split: each rank reads its half
    "convert reshard 1 -> 2": ("mp1", 1, "reshard"),
    "convert to_hf": ("mp1", 1, "to_hf"),
}
GB = 1e9


def memory() -> dict:
    """Resident bytes of this process now (VmRSS, split into RssAnon and RssFile) and at its peak (VmHWM)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024  # kB
    return fields


def measure(ckpt_dir: str, tokenizer_path: str, what: str, out_dir: str) -> None:
    """Child process: load (what = bf16 / fp32) or convert (what = reshard / to_hf), print one RESULT line."""
    from llama import Llama, convert

    before = memory()
    start = time.perf_counter()
    kept, touch = 0, 0.0
    if what == "reshard":
        convert.reshard(ckpt_dir, os.path.join(out_dir, "resharded"), model_parallel_size=2)
    elif what == "to_hf":
        convert.to_hf(ckpt_dir, os.path.join(out_dir, "hf"), tokenizer_path, max_shard_bytes=10**9)
    else:
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=16, max_batch_size=1, device="cpu", dtype=what)
        model = generator.model  # the KV cache (buffers too) is negligible at 16 positions
        kept = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
    seconds = time.perf_counter() - start
    if kept:
        start = time.perf_counter()
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.layout == torch.strided:  # packed weights are private copies, already read
                t.detach().sum()  # reads every page, as the first forward would
        touch = time.perf_counter() - start
    rank = int(os.environ.get("RANK", 0))
    print("RESULT " + json.dumps({"rank": rank, "seconds": seconds, "touch": touch, "before": before,
                                  "after": memory(), "kept": kept}))


def main(n_layers: int = 12, work_dir: Optional[str] = None) -> None:
    """Write the checkpoint, run every case in CASES, print a table."""
    from llama import convert

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tokenizer_path = os.path.join(tmp, "tokenizer.model")
        train_tokenizer(tokenizer_path)
        params = {**PARAMS, "n_layers": n_layers}
        print(f"writing a random checkpoint ({params}) ...", flush=True)
        make_checkpoint(os.path.join(tmp, "mp1"), params, VOCAB, dtype=torch.bfloat16)
        convert.reshard(os.path.join(tmp, "mp1"), os.path.join(tmp, "mp2"), model_parallel_size=2)
        size = os.path.getsize(os.path.join(tmp, "mp1", "consolidated.00.pth"))

        rows = []
        for label, (ckpt, nproc, what) in CASES.items():
            out_dir = tempfile.mkdtemp(dir=tmp)
            launcher = [sys.executable] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            cmd = launcher + [os.path.abspath(__file__), "measure", os.path.join(tmp, ckpt), tokenizer_path, what,
                              out_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            results = [json.loads(l[len("RESULT "):]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not results:
                print(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                continue
            rows += [(label, r) for r in sorted(results, key=lambda r: r["rank"])]

    print(f"\ncheckpoint: {size / GB:.2f} GB bf16 (dim {PARAMS['dim']}, {n_layers} layers), warm page cache, CPU")
    print(f"{'case':<28}{'rank':>5}{'build s':>8}{'read s':>7}{'RSS before':>11}{'after':>7}{'anon':>6}{'file':>6}"
          f"{'peak':>6}{'peak - before':>14}{'rank keeps':>11}   (GB)")
    for label, r in rows:
        before, after = r["before"], r["after"]
        print(f"{label:<28}{r['rank']:>5}{r['seconds']:>8.2f}{r['touch']:>7.2f}{before['VmRSS'] / GB:>11.2f}"
              f"{after['VmRSS'] / GB:>7.2f}{after['RssAnon'] / GB:>6.2f}{after['RssFile'] / GB:>6.2f}"
              f"{after['VmHWM'] / GB:>6.2f}{(after['VmHWM'] - before['VmRSS']) / GB:>14.2f}{r['kept'] / GB:>11.2f}")


if __name__ == "__main__":
    fire.Fire({"main": main, "measure": measure} if len(sys.argv) > 1 and sys.argv[1] == "measure" else main)
