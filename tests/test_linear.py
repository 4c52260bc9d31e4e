"""Inference linears swapped in after loading compute what fairscale's layers compute."""

import pytest
import torch
import torch.nn.functional as F

from llama.linear import PackedBf16Linear, Scratch
from llama.model import column_parallel


def layer_with(weight: torch.Tensor):
    layer = column_parallel(weight.shape[1], weight.shape[0])
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


@pytest.fixture(autouse=True)
def model_parallel(build):
    build("mha")  # fairscale's layers need its (one-process) model-parallel group


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("upcast_large", [True, False])
def test_packed_bf16_linear_matches_f_linear(rows, upcast_large):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(2, rows, 64, generator=gen).bfloat16()
    packed = PackedBf16Linear(layer_with(weight), world_size=1, weight=weight, scratch=Scratch())
    packed.upcast_large = upcast_large
    with torch.inference_mode():
        out = packed(x)
    reference = F.linear(x.float(), weight.float())  # exact products of the bf16 values, summed in fp32
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, 96)
    # only the final rounding to bf16 (relative 2^-8) may differ
    assert torch.allclose(out.float(), reference, rtol=2**-7, atol=1e-2)


def test_bf16_cpu_build_is_packed_and_tracks_fp32(build):
    fp32, bf16 = build("gqa").model, build("gqa", dtype="bf16").model
    assert isinstance(bf16.layers[0].attention.wq, PackedBf16Linear)
    assert isinstance(bf16.output, PackedBf16Linear)
    tokens = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        exact = fp32.forward(tokens, 0)
        approx = bf16.forward(tokens, 0)  # 80 rows: the fp32-upcast route on CPUs without native bf16
        step = bf16.forward(tokens[:, -1:], 39)  # 2 rows: the packed bf16 kernel, against the prefilled cache
    scale = exact.abs().max().item()
    assert (approx - exact).abs().max().item() < 0.025 * scale  # measured ~0.01
    assert (step[:, 0] - exact[:, -1]).abs().max().item() < 0.025 * scale
    top1 = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert top1 > 0.9
