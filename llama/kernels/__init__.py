"""Kernels for particular hardware, beside the model: cpu.cpp's, built and declared by cpu.py, which puts them behind
the ops of llama/ops.py, the CPU linears (llama/linear.py) and the one-call decode step (llama/engine.py)."""
