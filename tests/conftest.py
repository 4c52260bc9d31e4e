"""Fixtures: a tokenizer trained like Llama's and tiny random checkpoints in Meta's format, made once per run.

LLAMA_TEST_DEVICE (default cpu; cuda, cuda:N or mps) is the device every test that builds or runs a model uses:
the `build` fixture puts models there and the `device` fixture says where to put inputs. A device this machine
lacks stops the run at once with the library's reason. Tests that only make sense on the CPU (our CPU kernels,
subprocesses and torchrun with gloo, the tools and the server) carry `@pytest.mark.cpu_only(why)` and skip with
that reason on any other device; tests of files and tokenizers involve no device and run as they do on the CPU.
benchmarks/gpu_check.sh runs the device's subset on CUDA."""

import os

import pytest
import torch

from llama.tiny import CONFIGS, TOKENIZER_VOCAB, make_checkpoint, train_tokenizer

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): skipped unless LLAMA_TEST_DEVICE is the CPU, saying why")
    from llama import runtime

    try:
        runtime.check_device(DEVICE)
    except ValueError as err:
        raise pytest.UsageError(f"LLAMA_TEST_DEVICE={DEVICE}: {err}") from None


def pytest_collection_modifyitems(config, items):
    if torch.device(DEVICE).type != "cpu":
        for item in items:
            marker = item.get_closest_marker("cpu_only")
            if marker is not None:
                item.add_marker(pytest.mark.skip(reason=f"CPU only (LLAMA_TEST_DEVICE={DEVICE}): {marker.args[0]}"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """LLAMA_TEST_DEVICE, where models are built and their inputs go."""
    return torch.device(DEVICE)


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
def build(tiny_dir, tokenizer_path, device):
    """build(config, shards=1, **kwargs) -> Llama in fp32 on LLAMA_TEST_DEVICE, cached per arguments."""
    from llama import Llama

    cache = {}

    def _build(config="mha", shards=1, max_seq_len=64, max_batch_size=4, **kwargs):
        key = (config, shards, max_seq_len, max_batch_size, tuple(sorted(kwargs.items())))
        if key not in cache:
            kwargs = {"device": str(device), "dtype": "fp32", **kwargs}
            ckpt = os.path.join(tiny_dir, f"{config}-mp{shards}")
            cache[key] = Llama.build(ckpt, tokenizer_path, max_seq_len, max_batch_size, **kwargs)
        return cache[key]

    return _build
