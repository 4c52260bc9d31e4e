from setuptools import find_packages, setup


def requirements():
    with open("requirements.txt") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Inference for Meta's Llama 2 checkpoints: Meta-compatible API, runs on CPU, CUDA and MPS",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama.kernels": ["cpu.cpp"]},  # compiled on first use, see llama/kernels/cpu.py
    python_requires=">=3.9",
    install_requires=requirements(),
    extras_require={"test": ["pytest", "transformers>=5", "safetensors"]},
    entry_points={"console_scripts": ["llama-chat = llama.chat:entry_point"]},
)
