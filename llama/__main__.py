"""`python -m llama` lists the command line tools; `python -m llama TOOL ARGS...` runs `python -m llama.TOOL ARGS...`."""

import runpy
import sys

TOOLS = {
    "chat": "talk to a chat model in the terminal, answers streamed (also `llama-chat`)",
    "convert": "reshard Meta checkpoints, convert to and from Hugging Face's format, pre-quantize",
    "serve": "an OpenAI-compatible HTTP server with continuous batching and a chat page (also `llama-serve`)",
    "tiny": "write a tiny random checkpoint and tokenizer in Meta's format, to try things on",
}
EXAMPLES = ("example_text_completion.py", "example_chat_completion.py")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        tool = sys.argv.pop(1)
        sys.argv[0] = f"python -m llama.{tool}"
        runpy.run_module(f"llama.{tool}", run_name="__main__", alter_sys=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help"):
        print(f"error: unknown tool {sys.argv[1]!r}; choose one of {', '.join(TOOLS)}", file=sys.stderr)
        sys.exit(2)
    print("Tools, each run as `python -m llama.TOOL` (or `python -m llama TOOL`) with --help for its flags:\n")
    for tool, about in TOOLS.items():
        print(f"  {tool:10} {about}")
    print(f"\nIn the repository, {' and '.join(EXAMPLES)} run Meta's examples; torchrun runs any of them on several "
          "processes.")


if __name__ == "__main__":
    main()
