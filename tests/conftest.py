"""Fixtures: a tokenizer trained like Llama's and tiny random checkpoints in Meta's format, made once per run.

LLAMA_TEST_DEVICE (default cpu) is the device the `build` fixture puts models on (so far the tests of
test_model.py follow it; benchmarks/gpu_check.sh runs them on CUDA)."""

import os

import pytest

from llama.tiny import CONFIGS, TOKENIZER_VOCAB, make_checkpoint, train_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tokenizer.model plus, for each config, `<config>-mp1` and `<config>-mp2` checkpoints of the same weights."""
    root = tmp_path_factory.mktemp("tiny")
    train_tokenizer(str(root / "tokenizer.model"))
    for name, params in CONFIGS.items():
        for n_shards in (1, 2):
            make_checkpoint(str(root / f"{name}-mp{n_shards}"), params, TOKENIZER_VOCAB, n_shards, seed=0)
    return root


@pytest.fixture(scope="session")
def tokenizer_path(tiny_dir):
    return str(tiny_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def build(tiny_dir, tokenizer_path):
    """build(config, shards=1, **kwargs) -> Llama in fp32 on LLAMA_TEST_DEVICE, cached per arguments."""
    from llama import Llama

    cache = {}

    def _build(config="mha", shards=1, max_seq_len=64, max_batch_size=4, **kwargs):
        key = (config, shards, max_seq_len, max_batch_size, tuple(sorted(kwargs.items())))
        if key not in cache:
            kwargs = {"device": os.environ.get("LLAMA_TEST_DEVICE", "cpu"), "dtype": "fp32", **kwargs}
            ckpt = os.path.join(tiny_dir, f"{config}-mp{shards}")
            cache[key] = Llama.build(ckpt, tokenizer_path, max_seq_len, max_batch_size, **kwargs)
        return cache[key]

    return _build
