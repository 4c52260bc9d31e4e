"""Run under torchrun by test_distributed.py: build a checkpoint on this process group, save logits and greedy
tokens (rank 0) so the test can compare them with a one-process run.

    torchrun --nproc_per_node N tests/mp_worker.py CKPT_DIR TOKENIZER OUT_FILE [QUANTIZE GROUP_SIZE]
"""

import sys

import torch
import torch.distributed as dist

from llama import Llama

PROMPTS = [[1, 100, 200, 300, 400, 17], [1, 42, 43]]
LOGIT_TOKENS = torch.arange(3, 3 + 2 * 30).remainder(500).view(2, 30)


def run(ckpt_dir: str, tokenizer_path: str, quantize=None, group_size=128) -> dict:
    """Logits of LOGIT_TOKENS and greedy continuations of PROMPTS, in fp32 on the CPU (weights quantized if asked)."""
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu", dtype="fp32",
                            quantize=quantize, group_size=group_size)
    with torch.inference_mode():
        logits = generator.model.forward(LOGIT_TOKENS, 0)
    tokens, _ = generator.generate(PROMPTS, max_gen_len=10, temperature=0)
    return {"logits": logits, "tokens": tokens, "world_size": dist.get_world_size()}


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2], *(sys.argv[4:5] + [int(g) for g in sys.argv[5:6]]))
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[3])
    dist.destroy_process_group()  # exiting with gloo's threads alive can abort ("terminate called ...")
