"""Model-parallel runs under torchrun (gloo on the CPU) agree with one process."""

import os
import subprocess
import sys
import time

import pytest
import torch

import mp_worker
from llama import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
pytestmark = pytest.mark.cpu_only("torchrun with gloo on the CPU")


def torchrun(nproc: int, ckpt_dir, tokenizer_path, out_file, *args, script=os.path.join(HERE, "mp_worker.py")):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           str(ckpt_dir), str(tokenizer_path), str(out_file), *map(str, args)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out_file, weights_only=True)


def rank_worker(nproc: int, mode: str, ckpt_dir, tokenizer_path, out_file) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(HERE, "rank_worker.py"), mode, str(ckpt_dir), str(tokenizer_path), str(out_file)]


@pytest.fixture(scope="module")
def single_process(tiny_dir, tokenizer_path):
    """Reference results from the 1-shard checkpoints in this process."""
    return {config: mp_worker.run(str(tiny_dir / f"{config}-mp1"), tokenizer_path) for config in ("mha", "gqa")}


@pytest.mark.parametrize("config", ["mha", "gqa"])
def test_two_shards_on_two_processes_match_one_process(tiny_dir, tokenizer_path, single_process, tmp_path, config):
    result = torchrun(2, tiny_dir / f"{config}-mp2", tokenizer_path, tmp_path / "out.pt")
    reference = single_process[config]
    assert result["world_size"] == 2
    assert (result["logits"] - reference["logits"]).abs().max().item() <= 1e-5
    assert result["tokens"] == reference["tokens"]


@pytest.mark.parametrize(
    "checkpoint, nproc",
    [("mha-mp1", 2),  # one shard split on load
     ("gqa-mp2", 4)],  # 4 processes, 2 KV heads: each KV head replicated on 2 ranks
)
def test_any_shard_count_on_any_process_count(tiny_dir, tokenizer_path, single_process, tmp_path, checkpoint, nproc):
    result = torchrun(nproc, tiny_dir / checkpoint, tokenizer_path, tmp_path / "out.pt")
    reference = single_process[checkpoint.split("-")[0]]
    assert result["world_size"] == nproc
    assert (result["logits"] - reference["logits"]).abs().max().item() <= 1e-5
    assert result["tokens"] == reference["tokens"]


@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32)])
def test_quantized_model_parallel_tracks_one_process(tiny_dir, tokenizer_path, single_process, tmp_path, mode,
                                                     group_size):
    """Each rank quantizes its own slice. int4's groups (along the input features) never straddle two ranks' slices,
    so 2 processes compute the one-process int4 model; int8's row-parallel slices get scales of their own, so the
    2-process int8 model is held to the int8 bounds against fp32 instead."""
    from test_quantize import BOUNDS, logit_errors

    result = torchrun(2, tiny_dir / "mha-mp2", tokenizer_path, tmp_path / "out.pt", mode, group_size)
    assert result["world_size"] == 2
    if mode == "int4":
        one_process = mp_worker.run(str(tiny_dir / "mha-mp1"), tokenizer_path, mode, group_size)
        assert (result["logits"] - one_process["logits"]).abs().max().item() <= 1e-4
        assert result["tokens"] == one_process["tokens"]
    else:
        rel_rms, kl, top1 = logit_errors(single_process["mha"]["logits"], result["logits"])
        max_rel_rms, max_kl, min_top1 = BOUNDS[mode]
        assert rel_rms < max_rel_rms and kl < max_kl and top1 >= min_top1, (rel_rms, kl, top1)


def test_rank_0s_request_is_what_every_rank_computes(tiny_dir, tokenizer_path, tmp_path):
    """Ranks that ask for different prompts (of different lengths and counts) all compute and return rank 0's."""
    from rank_worker import RANK_PROMPTS

    proc = subprocess.run(rank_worker(2, "differ", tiny_dir / "gqa-mp2", tokenizer_path, tmp_path / "out.pt"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{tmp_path / 'out.pt'}.rank{r}", weights_only=True) for r in range(2)]
    alone = Llama.build(str(tiny_dir / "gqa-mp1"), tokenizer_path, 64, 4, device="cpu", dtype="fp32")
    assert ranks[0] == ranks[1]
    assert ranks[0]["tokens"] == alone.generate(RANK_PROMPTS[0], max_gen_len=10, temperature=0)[0]
    assert ranks[0]["streamed"] == list(alone.text_completion_stream(["hello", "the cat"], max_gen_len=6,
                                                                    temperature=0, stop=["zz"]))


def test_a_stalled_rank_fails_the_others_within_the_timeout(tiny_dir, tokenizer_path, tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(rank_worker(2, "stall", tiny_dir / "gqa-mp2", tokenizer_path, tmp_path / "out.pt"),
                          env={**ENV, "LLAMA_DIST_TIMEOUT": "3"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 60
    assert "error: waited LLAMA_DIST_TIMEOUT for another process, which is stuck or has died" in proc.stderr
