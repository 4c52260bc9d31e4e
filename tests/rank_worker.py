"""Run under torchrun by test_distributed.py, as a command line tool, with ranks that do not agree:

    torchrun --nproc_per_node 2 tests/rank_worker.py differ CKPT_DIR TOKENIZER OUT_FILE
        each rank asks for its own prompts; every rank saves what it got (OUT_FILE.rankN)
    torchrun --nproc_per_node 2 tests/rank_worker.py stall CKPT_DIR TOKENIZER OUT_FILE
        rank 1 stops taking part after the build; rank 0's request must fail within LLAMA_DIST_TIMEOUT
"""

import time

import torch
import torch.distributed as dist

from llama import Llama
from llama.cli import run

RANK_PROMPTS = [[[1, 100, 200, 300, 400, 17], [1, 42, 43]], [[1, 7, 8, 9, 10, 11, 12, 13, 14, 15]]]


def main(mode: str, ckpt_dir: str, tokenizer_path: str, out_file: str) -> None:
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="fp32")
    rank = dist.get_rank()
    if mode == "stall" and rank == 1:
        time.sleep(600)
    tokens, _ = generator.generate(RANK_PROMPTS[rank], max_gen_len=10, temperature=0)
    streamed = list(generator.text_completion_stream([["hello", "the cat"], ["something longer here"]][rank],
                                                     max_gen_len=6, temperature=0, stop=[["zz"], []][rank]))
    torch.save({"tokens": tokens, "streamed": streamed}, f"{out_file}.rank{rank}")


if __name__ == "__main__":
    run(main, "rank_worker.py")
