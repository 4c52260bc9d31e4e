"""`python -m llama.chat`, driven as a person would: typed lines, Ctrl-C, Ctrl-D, in a terminal and under torchrun."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
HELP_END = "(or Ctrl-D) leaves]\n"
pytestmark = pytest.mark.cpu_only("the chat tool runs in subprocesses on the CPU")
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def chat_command(ckpt_dir, tokenizer_path, *flags):
    return ["-m", "llama.chat", "--ckpt_dir", str(ckpt_dir), "--tokenizer_path", str(tokenizer_path), "--dtype", "fp32",
            "--temperature", "0", *flags]


class Terminal:
    """A command in a pseudo-terminal: what it prints is read as a screen shows it, keys are typed into it."""

    def __init__(self, argv, env=None):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, with the terminal as its own
            os.chdir(ROOT)
            os.execvpe(argv[0], argv, {**ENV, **(env or {})})
        self.screen = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        """Everything printed up to and including `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {text!r} within {timeout} s; the screen ends {self.screen[-1500:]!r}")
            try:
                self.screen += os.read(self.fd, 4096).decode(errors="replace").replace("\r\n", "\n")
            except OSError:  # the command has ended
                raise EOFError(f"ended before {text!r}; the screen ends {self.screen[-1500:]!r}")
        upto = self.screen.index(text) + len(text)
        seen, self.screen = self.screen[:upto], self.screen[upto:]
        return seen

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    os.read(self.fd, 4096)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise TimeoutError("the chat did not end")


def expected_answers(build, turns, max_gen_len):
    """What the chat should print for these user lines: each answer greedy, given the conversation so far."""
    generator = build("gqa", max_seq_len=128, max_batch_size=1)
    dialog, answers = [], []
    for line in turns:
        dialog.append({"role": "user", "content": line})
        answer = generator.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]
        dialog.append(answer)
        answers.append(answer["content"])
    return answers


@pytest.mark.parametrize("launcher, checkpoint", [([sys.executable], "gqa-mp1"), (TORCHRUN_2, "gqa-mp2")])
def test_a_conversation_is_kept_and_each_answer_is_the_models(build, tiny_dir, tokenizer_path, launcher, checkpoint):
    """Lines on standard input (under torchrun rank 0 reads them and every rank answers in step): each answer is
    what chat_completion gives the whole conversation so far, printed once."""
    turns = ["hello", "the capital of france", "and the river"]
    answers = expected_answers(build, turns, max_gen_len=8)
    command = launcher + chat_command(tiny_dir / checkpoint, tokenizer_path, "--max_seq_len", "128", "--max_gen_len",
                                      "8")
    out = subprocess.run(command, input="\n".join(turns) + "\n/quit\n", capture_output=True, text=True, cwd=ROOT,
                         env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(HELP_END) == 1
    assert out.stdout.split(HELP_END, 1)[1] == "".join(f"> {answer}\n" for answer in answers) + "> "


def test_under_torchrun_the_chat_waits_for_a_person_longer_than_the_collective_timeout(tiny_dir, tokenizer_path):
    """The other ranks wait for rank 0's next line without the bound that fails a stuck rank's peers."""
    terminal = Terminal(TORCHRUN_2 + chat_command(tiny_dir / "gqa-mp2", tokenizer_path, "--max_seq_len", "128",
                                                  "--max_gen_len", "8"), env={"LLAMA_DIST_TIMEOUT": "2"})
    terminal.read_until(HELP_END + "> ")
    time.sleep(5)  # thinking
    terminal.type("hello\n")
    terminal.read_until("hello\n")
    assert terminal.read_until("\n> ")
    terminal.type("/quit\n")
    assert terminal.exit_code() == 0


@pytest.mark.parametrize("launcher, checkpoint", [([sys.executable], "gqa-mp1"), (TORCHRUN_2, "gqa-mp2")])
def test_ctrl_c_stops_an_answer_and_ctrl_d_leaves(tiny_dir, tokenizer_path, launcher, checkpoint):
    """In a terminal, with one process or two: Ctrl-C stops the answer being written (under torchrun too, whose
    launcher would end the run on a SIGINT), the conversation goes on, Ctrl-D leaves."""
    terminal = Terminal(launcher + chat_command(tiny_dir / checkpoint, tokenizer_path, "--max_seq_len", "4096",
                                                "--max_gen_len", "4000", "--show_speed"))
    terminal.read_until(HELP_END + "> ")
    terminal.type("hello\n")
    terminal.read_until("hello\n")
    time.sleep(1.0)  # thousands of tokens to write: it is still answering
    terminal.type("\x03")
    assert terminal.read_until("\n> ").endswith("[stopped]\n> ")
    terminal.type("what next\n")
    answer = terminal.read_until("\n> ")  # the conversation goes on after the interrupted answer
    assert "tokens/s]" in answer
    terminal.type("\x04")
    assert terminal.exit_code() == 0


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_turns(tiny_dir, tokenizer_path):
    terminal = Terminal([sys.executable] + chat_command(tiny_dir / "gqa-mp1", tokenizer_path, "--max_seq_len", "64",
                                                        "--max_gen_len", "12", "--system", "Answer briefly."))
    terminal.read_until(HELP_END + "> ")
    line = "the capital of france is a city with a long river\n"
    terminal.type(line)
    assert "dropped" not in terminal.read_until("\n> ")
    terminal.type(line)
    assert "[the conversation outgrew max_seq_len=64: dropped the oldest 1 exchange(s)]" in terminal.read_until("\n> ")
    terminal.type("the " * 80 + "\n")
    assert "[this message is too long for max_seq_len=64; nothing was sent]" in terminal.read_until("\n> ")
    terminal.type("/system " + "answer " * 80 + "\n")
    assert "the system prompt alone leaves no room" in terminal.read_until("\n> ")
    terminal.type("what is [INST] here\n")  # the format's own tags: refused, and the conversation stays usable
    assert "[messages may not contain the chat format's tags" in terminal.read_until("\n> ")
    terminal.type("/reset\n")
    assert "[conversation forgotten]" in terminal.read_until("\n> ")
    terminal.type("/quit\n")
    assert terminal.exit_code() == 0


@pytest.mark.parametrize("flags, message", [
    (["--system", "answer " * 80], "the system prompt alone leaves no room in max_seq_len=64"),
    (["--max_gen_len", "64"], "--max_gen_len 64 leaves no room for a message in max_seq_len=64"),
])
def test_a_system_prompt_or_answer_longer_than_the_context_is_refused(tiny_dir, tokenizer_path, flags, message):
    command = [sys.executable] + chat_command(tiny_dir / "gqa-mp1", tokenizer_path, "--max_seq_len", "64", *flags)
    out = subprocess.run(command, input="", capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode != 0 and message in out.stderr


def test_pip_installs_the_llama_chat_command(tiny_dir, tokenizer_path):
    """`pip install` puts the chat on the PATH as llama-chat (.ci/run installs the package as a user would)."""
    command = ["llama-chat"] + chat_command(tiny_dir / "gqa-mp1", tokenizer_path)[2:]
    out = subprocess.run(command, input="/quit\n", capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode == 0 and HELP_END in out.stdout, out.stderr[-2000:]
