"""Complete a few prompts with a pretrained Llama 2 model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
"""

from typing import Optional

from llama import Llama
from llama.cli import run
from llama.generation import check_request
from llama.runtime import print_rank0
from llama.tokenizer import Tokenizer

PROMPTS = [
    # plain prompts: the model continues the text
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # few-shot prompt: examples show the task, the model completes the pattern
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    compile: bool = False,
    seed: int = 1,
    threads: Optional[int] = None,
):
    """Run the example prompts; --device (cpu, cuda, mps) and --dtype (bf16, fp16, fp32) override the defaults;
    --quantize int8|int4 (with --group_size for int4) stores the linear weights quantized;
    --compile compiles the decode step (tens of seconds at start, faster tokens after); --seed seeds the sampling;
    --threads fixes the number of CPU threads."""
    tokenizer = Tokenizer(tokenizer_path)  # the request is checked before the model loads
    check_request([tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS], max_gen_len, temperature, top_p,
                  max_seq_len, max_batch_size, tokenizer.n_words)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, device=device,
                            dtype=dtype, quantize=quantize, group_size=group_size, compile=compile, threads=threads)
    results = generator.text_completion(PROMPTS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for prompt, result in zip(PROMPTS, results):
        print_rank0(prompt)
        print_rank0(f"> {result['generation']}")
        print_rank0("\n==================================\n")


if __name__ == "__main__":
    run(main, "example_text_completion.py")
