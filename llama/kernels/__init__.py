"""Faster ways to run the model on particular hardware, beside it: cpu.cpp's kernels behind the ops of llama/ops.py
and the CPU linears (cpu.py), and the one-call CPU decode step (engine.py)."""
