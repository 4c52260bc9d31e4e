"""Talk to a Llama 2 or Llama 3 chat model in the terminal, each answer streamed as it is written.

    python -m llama.chat --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model [--system "Answer briefly."]
    torchrun --nproc_per_node 2 -m llama.chat --ckpt_dir llama-2-13b-chat/ --tokenizer_path tokenizer.model

Commands: /reset (forget the conversation), /system TEXT (a new system prompt, and a fresh conversation), /help,
/quit (or Ctrl-D). Ctrl-C stops the answer being written. When the conversation outgrows max_seq_len, its oldest
turns are dropped, and the chat says so. Under torchrun, rank 0 reads the terminal and sends each line, and each
Ctrl-C, to the other ranks, so every rank generates the same answer in step.
"""

import os
import select
import sys
import termios
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from llama import runtime
from llama.cli import run
from llama.dialog import CHAT_FORMATS, Dialog, encode_dialog
from llama.generation import Llama, check_sampling
from llama.runtime import print_rank0
from llama.tokenizer import tokenizer_kind

HELP = "/reset forgets the conversation, /system TEXT sets a new system prompt, /quit (or Ctrl-D) leaves"


def read_line(prompt: str) -> str:
    """A line from the terminal on rank 0, sent to every rank; '/quit' at end of input."""
    line = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            line = input(prompt)
        except EOFError:
            print()
            line = "/quit"
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [line]
        dist.broadcast_object_list(shared, src=0, group=runtime.waiting_group())  # the person takes their time
        line = shared[0]
    return line


class StopKey:
    """Ctrl-C while an answer is written, read by rank 0 as a key rather than a signal (the terminal's signal keys
    and line buffering turned off meanwhile): torchrun would end the run on SIGINT, and a key can be sent to the
    other ranks at the same point of the answer. Other keys typed meanwhile are discarded."""

    def __init__(self, device: torch.device):
        self.device = device
        self.shared = dist.is_initialized() and dist.get_world_size() > 1
        reader = not dist.is_initialized() or dist.get_rank() == 0
        self.fd = sys.stdin.fileno() if reader and sys.stdin.isatty() else None
        self.saved = None

    def __enter__(self) -> "StopKey":
        if self.fd is not None:
            self.saved = termios.tcgetattr(self.fd)
            keys = termios.tcgetattr(self.fd)
            keys[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)  # lflags
            termios.tcsetattr(self.fd, termios.TCSANOW, keys)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def pressed(self) -> bool:
        """Whether Ctrl-C was pressed since the last call: the same answer on every rank."""
        hit = False
        while self.fd is not None and select.select([self.fd], [], [], 0)[0]:
            hit |= b"\x03" in os.read(self.fd, 64)
        if self.shared:
            flag = torch.tensor([int(hit)], device=self.device)
            dist.broadcast(flag, src=0)
            hit = bool(flag.item())
        return hit


def check_answer_room(answer_room: int, max_seq_len: int) -> None:
    if not 0 < answer_room < max_seq_len:
        raise ValueError(f"--max_gen_len {answer_room} leaves no room for a message in max_seq_len={max_seq_len}: "
                         "choose a smaller one")


def check_system_tags(system: Optional[str], tags: Sequence[str]) -> None:
    if system and any(tag in system for tag in tags):
        raise ValueError(f"the system prompt may not contain the chat format's tags {list(tags)}")


class Chat:
    """A conversation: the system prompt and the turns so far, kept within the context."""

    def __init__(self, generator: Llama, system: Optional[str], answer_room: int):
        check_answer_room(answer_room, generator.model.params.max_seq_len)
        self.generator = generator
        self.tags = generator.chat_format.special_tags  # what messages may not contain
        self.answer_room = answer_room  # tokens kept free for each answer
        self.system = system
        self.turns: Dialog = []
        self.check_system()

    def check_system(self) -> None:
        check_system_tags(self.system, self.tags)
        if self.prompt_tokens([{"role": "user", "content": ""}]) > self.limit():
            raise ValueError(f"the system prompt alone leaves no room in max_seq_len="
                             f"{self.generator.model.params.max_seq_len} for a message and an answer of "
                             f"{self.answer_room} tokens: shorten it, or raise --max_seq_len")

    def limit(self) -> int:
        return self.generator.model.params.max_seq_len - self.answer_room

    def dialog(self, turns: Dialog) -> Dialog:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_tokens(self, turns: Dialog) -> int:
        return len(encode_dialog(self.generator.tokenizer, self.dialog(turns)))

    def ask(self, message: str) -> Optional[Dialog]:
        """The dialog to answer with `message` added, dropping the oldest turns as needed (and saying so); None
        when the message alone is too long, or holds the chat format's tags."""
        if any(tag in message for tag in self.tags):
            print_rank0(f"[messages may not contain the chat format's tags {list(self.tags)}; nothing was sent]")
            return None
        turns = self.turns + [{"role": "user", "content": message}]
        dropped = 0
        while self.prompt_tokens(turns) > self.limit() and len(turns) > 1:
            turns = turns[2:]
            dropped += 1
        if self.prompt_tokens(turns) > self.limit():
            print_rank0(f"[this message is too long for max_seq_len={self.generator.model.params.max_seq_len}; "
                        "nothing was sent]")
            return None
        if dropped:
            print_rank0(f"[the conversation outgrew max_seq_len={self.generator.model.params.max_seq_len}: dropped "
                        f"the oldest {dropped} exchange(s)]")
        self.turns = turns
        return self.dialog(turns)


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: Optional[int] = None,
    seed: int = 1,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    show_speed: bool = False,
    threads: Optional[int] = None,
):
    """Chat with the model in ckpt_dir; --system sets a system prompt; the other flags are the examples'.
    --max_gen_len bounds each answer (default: a quarter of max_seq_len); --show_speed prints tokens/s after each
    answer; --threads fixes the number of CPU threads."""
    answer_room = max_gen_len or max_seq_len // 4
    check_answer_room(answer_room, max_seq_len)  # before the model loads
    check_sampling(answer_room, temperature, top_p)
    tokenizer_file = tokenizer_path or os.path.join(ckpt_dir, "tokenizer.model")
    if os.path.isfile(tokenizer_file):  # else Llama.build says what is missing
        check_system_tags(system, CHAT_FORMATS[tokenizer_kind(tokenizer_file)].special_tags)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size=1, seed=seed, device=device,
                            dtype=dtype, quantize=quantize, group_size=group_size, threads=threads)
    chat = Chat(generator, system, answer_room)
    print_rank0(f"[{HELP}]")
    while True:
        try:
            line = read_line("> ")
        except KeyboardInterrupt:  # at the prompt: a fresh line
            print_rank0()
            continue
        command, _, argument = line.strip().partition(" ")
        if command == "/quit":
            return
        if command == "/help" or not line.strip():
            print_rank0(f"[{HELP}]")
            continue
        if command == "/reset":
            chat.turns = []
            print_rank0("[conversation forgotten]")
            continue
        if command == "/system":
            previous, chat.system = chat.system, argument.strip() or None
            try:
                chat.check_system()
            except ValueError as err:
                chat.system = previous
                print_rank0(f"[{err}]")
                continue
            chat.turns = []
            print_rank0(f"[system prompt {'set' if chat.system else 'removed'}; conversation forgotten]")
            continue
        try:
            answer_turn(generator, chat, line, temperature, top_p, answer_room, show_speed)
        except KeyboardInterrupt:  # (one process) a SIGINT between reading the line and writing the answer
            print_rank0(" [stopped]")


def answer_turn(generator: Llama, chat: Chat, line: str, temperature: float, top_p: float, answer_room: int,
                show_speed: bool) -> None:
    """Answer one line of the user's, streaming the answer; it joins the conversation, even if stopped."""
    dialog = chat.ask(line)
    if dialog is None:
        return
    answer, tokens, start = [], 0, time.perf_counter()
    events = generator.chat_completion_stream([dialog], temperature=temperature, top_p=top_p,
                                              max_gen_len=answer_room)
    with StopKey(generator.model.tok_embeddings.weight.device) as stop_key:
        try:
            for event in events:
                print_rank0(event["text"], end="", flush=True)
                answer.append(event["text"])
                tokens = event.get("completion_tokens", tokens)
                if stop_key.pressed():
                    print_rank0(" [stopped]", end="")
                    break
        except KeyboardInterrupt:  # a SIGINT not from the keyboard (one process)
            print_rank0(" [stopped]", end="")
        finally:  # a stopped answer joins the conversation as far as it got
            events.close()
            chat.turns.append({"role": "assistant", "content": "".join(answer)})
    print_rank0()
    if show_speed and tokens:
        print_rank0(f"[{tokens} tokens, {tokens / (time.perf_counter() - start):.2f} tokens/s]")


def entry_point() -> None:
    """The `llama-chat` console script."""
    run(main, "llama-chat")


if __name__ == "__main__":
    run(main, "python -m llama.chat")
