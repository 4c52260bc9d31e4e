"""Chat with a Llama 2 chat model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import run
from llama.dialog import encode_dialog, validate_dialog
from llama.generation import check_request
from llama.runtime import print_rank0
from llama.tokenizer import Tokenizer

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": "Paris, the capital of France, is known for its stunning architecture, art museums, historical "
            "landmarks, and romantic atmosphere. The Eiffel Tower, the Louvre Museum and Notre-Dame Cathedral are "
            "among the top attractions.",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
    [
        {
            "role": "system",
            "content": "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
            "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
            "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
            "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead "
            "of answering something not correct. If you don't know the answer to a question, please don't share "
            "false information.",
        },
        {"role": "user", "content": "Write a brief birthday message to John"},
    ],
    [{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}],
]


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    compile: bool = False,
    seed: int = 1,
    threads: Optional[int] = None,
):
    """Answer the example dialogs; --device (cpu, cuda, mps) and --dtype (bf16, fp16, fp32) override the defaults;
    --quantize int8|int4 (with --group_size for int4) stores the linear weights quantized;
    --compile compiles the decode step (tens of seconds at start, faster tokens after); --seed seeds the sampling;
    --threads fixes the number of CPU threads."""
    tokenizer = Tokenizer(tokenizer_path)  # the request is checked before the model loads
    for i, dialog in enumerate(DIALOGS):
        validate_dialog(dialog, i)
    check_request([encode_dialog(tokenizer, d) for d in DIALOGS], max_gen_len or max_seq_len - 1, temperature,
                  top_p, max_seq_len, max_batch_size, tokenizer.n_words)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, device=device,
                            dtype=dtype, quantize=quantize, group_size=group_size, compile=compile, threads=threads)
    results = generator.chat_completion(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for dialog, result in zip(DIALOGS, results):
        for message in dialog:
            print_rank0(f"{message['role'].capitalize()}: {message['content']}\n")
        print_rank0(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print_rank0("\n==================================\n")


if __name__ == "__main__":
    run(main, "example_chat_completion.py")
