"""The example CLIs and the tiny-checkpoint quick start, run as a user would."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
