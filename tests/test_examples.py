"""The example CLIs and the tiny-checkpoint quick start, run as a user would."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.cpu_only("the examples and benchmarks run in subprocesses on the CPU")


def run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's quick start: python -m llama.tiny makes a checkpoint and tokenizer."""
    out = tmp_path_factory.mktemp("quickstart")
    run([sys.executable, "-m", "llama.tiny", str(out), "--config", "gqa", "--n_shards", "2"])
    assert sorted(os.listdir(out / "gqa")) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    return out


@pytest.mark.parametrize("launcher", [[sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]])
def test_text_completion_example(quickstart, launcher):
    out = run(launcher + ["example_text_completion.py", "--ckpt_dir", str(quickstart / "gqa"),
                          "--tokenizer_path", str(quickstart / "tokenizer.model"), "--max_gen_len", "8"])
    assert "I believe the meaning of life is\n> " in out
    assert out.count("==================================") == 4


def test_chat_example_on_two_processes_prints_once(quickstart):
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "example_chat_completion.py", "--ckpt_dir", str(quickstart / "gqa"),
               "--tokenizer_path", str(quickstart / "tokenizer.model"), "--max_gen_len", "8", "--temperature", "0"])
    assert out.count("==================================") == 6
    assert out.count("Loaded in") == 1
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in out


def test_generation_benchmark_reports_every_figure(quickstart, tmp_path):
    """benchmarks/bench_generate.py on a real --ckpt_dir, both engines: every row has its figures, each decode rate
    below (or, as a machine drifts, near) its ceiling."""
    out_json = tmp_path / "bench.json"
    out = run([sys.executable, "benchmarks/bench_generate.py", "--ckpt_dir", str(quickstart / "gqa"),
               "--tokenizer_path", str(quickstart / "tokenizer.model"), "--engines", "ours,hf", "--dtype", "fp32",
               "--threads", "1", "--max_gen_len", "4", "--json_path", str(out_json)])
    results = json.loads(out_json.read_text())["results"]
    assert sorted(results) == ["hf", "ours"] and "% ceiling" in out
    for row in results.values():
        for key in ("load_s", "first_generate_s", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_gb",
                    "bandwidth_gb_s", "ceiling_tok_s"):
            assert row[key] > 0, key


def test_a_prequantized_checkpoint_runs_in_the_examples(quickstart, tmp_path):
    """The README's flow: quantize once, then run the example on the smaller directory (its scheme is its own)."""
    quantized = tmp_path / "gqa-int8"
    run([sys.executable, "-m", "llama.convert", "quantize", str(quickstart / "gqa"), str(quantized), "--mode", "int8"])
    out = run([sys.executable, "example_text_completion.py", "--ckpt_dir", str(quantized),
               "--tokenizer_path", str(quickstart / "tokenizer.model"), "--max_gen_len", "4"])
    assert out.count("==================================") == 4


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh, with a tiny shape on the CPU: every part runs and writes its figures."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path),
                                            "LLAMA_CHECK_DEVICE": "cpu", "LLAMA_CHECK_SHAPE": "tiny",
                                            "LLAMA_CHECK_TESTS": "tests/test_model.py",  # the rest run here anyway
                                            "LLAMA_CHECK_DTYPE": "fp32", "LLAMA_CHECK_BENCH_FLAGS": "--max_gen_len 4"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch" in (out / "env.txt").read_text()
    assert " passed" in (out / "tests.log").read_text()
    results = json.loads((out / "bench.json").read_text())["results"]
    assert sorted(results) == ["ours", "ours compiled", "ours int4", "ours int8"]
    for row in results.values():
        assert row["decode_b1_tok_s"] > 0 and row["decode_b8_tok_s"] > 0 and row["prefill_tok_s"] > 0
