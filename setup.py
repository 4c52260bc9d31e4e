from setuptools import find_packages, setup


def requirements():
    with open("requirements.txt") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


SERVE = ["fastapi", "uvicorn"]  # python -m llama.serve

setup(
    name="llama",
    version="0.1.0",
    description="Inference for Meta's Llama 2 and 3.x checkpoints: Meta-compatible API, runs on CPU, CUDA and MPS",
    packages=find_packages(include=["llama", "llama.*"]),
    # cpu.cpp is compiled on first use (llama/kernels/cpu.py); static/ is the server's chat page
    package_data={"llama.kernels": ["cpu.cpp"], "llama": ["static/*"]},
    python_requires=">=3.9",
    install_requires=requirements(),
    extras_require={
        "serve": SERVE,
        # the server's tests drive it with OpenAI's client, raw HTTP and a headless Chromium (Debian's `chromium`)
        "test": ["pytest", "transformers>=5", "safetensors", *SERVE, "openai", "httpx", "playwright"],
    },
    entry_points={"console_scripts": ["llama-chat = llama.chat:entry_point", "llama-serve = llama.serve:entry_point"]},
)
