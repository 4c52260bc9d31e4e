"""The command line tools, run as a user runs them: mistakes refused before anything loads, as one line, once."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
pytestmark = pytest.mark.cpu_only("the tools run in subprocesses on the CPU")


def run(command, env=None, **kwargs):
    return subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=300, **kwargs)


def example(tiny_dir, tokenizer_path, *flags, script="example_text_completion.py", checkpoint="mha-mp1"):
    return [script, "--ckpt_dir", str(tiny_dir / checkpoint), "--tokenizer_path", tokenizer_path, *flags]


def assert_refused_at_once(proc, message, code=1):
    """One line of error on stderr, the exit code, and neither a process group nor a model set up."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {message}"] or (
        len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
    ), proc.stderr[-2000:]
    assert "initializing model parallel" not in proc.stdout and "Loaded in" not in proc.stdout


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_a_mistyped_flag_is_refused_before_anything_runs(tiny_dir, tokenizer_path, script):
    proc = run([sys.executable, *example(tiny_dir, tokenizer_path, "--max_gen_length", "4", script=script)])
    assert_refused_at_once(proc, f"{script} has no flag --max_gen_length; did you mean --max_gen_len? "
                                 f"(see {script} --help)", code=2)


@pytest.mark.parametrize("command, message", [
    (["-m", "llama.chat", "--ckpt_dir", "x", "--temprature", "0"], "has no flag --temprature; did you mean "
                                                                     "--temperature?"),
    (["-m", "llama.convert", "reshard", "a", "b", "--model_parallel_sise", "2"], "has no flag --model_parallel_sise"),
    (["-m", "llama.convert", "reshap", "a", "b"], "unknown command 'reshap'; choose one of reshard, to_hf"),
    (["-m", "llama.convert", "reshard", "a", "b", "2", "d"], "got unexpected argument(s) ['d']"),
    (["-m", "llama.tiny", "--seed", "3"], "python -m llama.tiny needs --out_dir"),
    (["-m", "llama", "tiny", "--n_shard", "2", "x"], "has no flag --n_shard; did you mean --n_shards?"),
])
def test_every_tool_refuses_a_bad_command_line_in_one_line(command, message):
    assert_refused_at_once(run([sys.executable, *command]), message, code=2)


@pytest.mark.parametrize("flags, message", [
    (["--top_p", "0"], "top_p must be in (0, 1], got 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0 (0 is greedy), got -1"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--max_batch_size", "2"], "4 prompts exceed max_batch_size=2"),
    (["--max_seq_len", "8"], "longer than max_seq_len=8"),
    (["--device", "cuda"], "device 'cuda' is not available"),
    (["--device", "mps"], "device 'mps' is not available"),
    (["--device", "gpu"], "unknown device 'gpu': choose cpu, cuda, cuda:N or mps"),
    (["--threads", "0"], "threads must be a positive integer, got 0"),
])
def test_bad_values_are_refused_before_the_model_loads(tiny_dir, tokenizer_path, flags, message):
    assert_refused_at_once(run([sys.executable, *example(tiny_dir, tokenizer_path, *flags)]), message)


def test_an_error_under_torchrun_is_printed_once_by_rank_0(tiny_dir, tokenizer_path):
    proc = run(TORCHRUN_2 + example(tiny_dir, tokenizer_path, "--top_p", "0", checkpoint="mha-mp2"))
    assert proc.returncode != 0
    assert proc.stderr.count("error: top_p must be in (0, 1]") == 1
    assert "llama/" not in proc.stderr  # no traceback of ours (torchrun prints its own summary)


def test_help_shows_optional_types_plainly():
    proc = run([sys.executable, "example_text_completion.py", "--help"], env={"PAGER": "cat"})
    out = proc.stdout + proc.stderr
    assert "Optional[str]" in out and "Optional[Optional]" not in out


def test_tiny_into_an_existing_folder_is_one_line(tiny_dir, tmp_path):
    first = run([sys.executable, "-m", "llama.tiny", str(tmp_path)])
    assert first.returncode == 0, first.stderr
    again = run([sys.executable, "-m", "llama.tiny", str(tmp_path)])
    assert_refused_at_once(again, f"{tmp_path / 'mha'} already exists; remove it or write to another folder")


def test_python_m_llama_lists_and_runs_the_tools(tmp_path):
    listing = run([sys.executable, "-m", "llama"])
    assert listing.returncode == 0 and all(f"  {tool}" in listing.stdout for tool in ("chat", "convert", "tiny"))
    made = run([sys.executable, "-m", "llama", "tiny", str(tmp_path), "--config", "gqa"])
    assert made.returncode == 0 and (tmp_path / "gqa" / "params.json").exists(), made.stderr
    unknown = run([sys.executable, "-m", "llama", "serv"])
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown tool 'serv'")


def test_seed_flag_and_the_kernel_compile_line(tiny_dir, tokenizer_path, tmp_path):
    """--seed picks the sampled text; the CPU kernels are compiled once per cache, and the user is told."""
    flags = ["--max_gen_len", "12", "--temperature", "1.0", "--top_p", "1.0"]
    cache = {"LLAMA_KERNEL_CACHE": str(tmp_path / "kernels")}
    first = run([sys.executable, *example(tiny_dir, tokenizer_path, *flags, "--seed", "3")], env=cache)
    again = run([sys.executable, *example(tiny_dir, tokenizer_path, *flags, "--seed", "3")], env=cache)
    other = run([sys.executable, *example(tiny_dir, tokenizer_path, *flags, "--seed", "4")], env=cache)
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr + other.stderr
    assert first.stderr.count("Compiling the CPU kernels for this CPU") == 1
    assert "Compiling" not in again.stderr
    texts = [[line for line in proc.stdout.splitlines() if not line.startswith("Loaded in")]
             for proc in (first, again, other)]
    assert texts[0] == texts[1] != texts[2]
