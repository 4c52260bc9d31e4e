"""Weight-only int8 / int4: the kernels compute what the quantized weights say, and the model stays close to fp32.

Thresholds: the test checkpoints have Gaussian random weights, the hardest case for quantization (no structure,
every group spans ~4 standard deviations). One int8 step per output channel is then ~1/30 of a weight's std, and
one int4 step per group of 32 ~1/4 of it; errors add up over 2 layers. The bounds below sit ~2x above the values
measured on these checkpoints (int8: relative RMS ~0.015, KL ~1e-4; int4/32: ~0.16, ~0.013), so a broken scale,
zero point or packing (errors of order 1) fails them while rounding noise does not.
"""

import subprocess
import sys

import pytest
import torch

from llama.formats.base import load_shard
from llama.kernels import cpu
from llama.linear import CpuLinear, Int4Linear, Int8Linear, Scratch, int4_linear, linear_factory
from llama.quantize import quantize_int4, quantize_int8, supported_quantize_modes
from llama.model import column_parallel
from llama.tiny import TOKENIZER_VOCAB, make_checkpoint

BOUNDS = {  # mode: (relative RMS error of logits, mean KL(fp32 || quantized), top-1 agreement at least)
    "int8": (0.03, 1e-3, 0.95),
    "int4": (0.3, 0.03, 0.7),
}


@pytest.fixture(autouse=True)
def model_parallel(build):
    build("mha")  # fairscale's layers need its (one-process) model-parallel group


def layer_with(weight):
    layer = column_parallel(weight.shape[1], weight.shape[0])
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def test_int8_round_trip_is_within_half_a_step():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    q, scales = quantize_int8(w)
    assert torch.equal(w, torch.randn(48, 96, generator=torch.Generator().manual_seed(0)))  # input left as it was
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert (q.abs().amax(dim=1) == 127).all()  # each row's largest weight is +-127 steps
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_int4_round_trip_is_within_half_a_step():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    q, sz = quantize_int4(w, group_size=32)
    assert torch.equal(w, torch.randn(48, 128, generator=torch.Generator().manual_seed(0)))  # input left as it was
    assert sz.shape == (4, 48, 2) and q.min() >= 0 and q.max() <= 15
    scales, zeros = sz[..., 0].t().repeat_interleave(32, dim=1), sz[..., 1].t().repeat_interleave(32, dim=1)
    dequantized = (q - 8) * scales + zeros
    assert ((dequantized - w).abs() <= scales / 2 + 1e-5).all()


def linear_class(device: torch.device, kind: str) -> type:
    """On the CPU int8 runs on our streaming kernel wherever it builds, int4 where the kernel takes the group size
    too; elsewhere on PyTorch's kernels."""
    if device.type != "cpu" or not cpu.available() or kind == "int4/32":
        return Int8Linear if kind == "int8" else Int4Linear
    return CpuLinear


def model_dtype(device: torch.device, mode: str) -> str:
    """fp32 where the mode has a kernel for it, else bf16 (int4 on CUDA); skips where the device has no kernel."""
    for dtype in ("fp32", "bf16"):
        if mode in supported_quantize_modes(device, torch.float32 if dtype == "fp32" else torch.bfloat16):
            return dtype
    pytest.skip(f"PyTorch has no {mode} kernel on {device.type}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linears_compute_their_dequantized_weights(device, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen).to(dtype)
    x = torch.randn(2, 3, 128, generator=gen).to(dtype)
    q8, s8 = quantize_int8(w)
    q4, sz = quantize_int4(w, 32)
    sz = sz.to(dtype).float()  # the layers keep scales in the model dtype
    w8 = q8.float() * s8.to(dtype).float()[:, None]
    w4 = (q4 - 8) * sz[..., 0].t().repeat_interleave(32, 1) + sz[..., 1].t().repeat_interleave(32, 1)
    int4 = "int4" in supported_quantize_modes(device, dtype)  # on CUDA, in bf16 only
    with torch.inference_mode():
        out8 = Int8Linear(layer_with(w), 1, q8.to(device), s8.to(dtype).to(device))(x.to(device)).cpu()
        if int4:
            out4 = Int4Linear(layer_with(w), 1, q4.to(device), sz.to(dtype).to(device), group_size=32)(x.to(device))
    for out, dequantized in ((out8, w8),) + (((out4.cpu(), w4),) if int4 else ()):
        reference = x.float() @ dequantized.t()
        # fp32: summation order only; bf16: the output is rounded to 8 significant bits
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        assert out.shape == (2, 3, 64) and (out.float() - reference).abs().max() <= tol * reference.abs().max()


@pytest.mark.cpu_only("our CPU kernels")
@pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_kernel_linear_matches_pytorch_int4(dtype):
    """Our int4 linear (decode rows on the streaming kernel; a prompt's in its tiles, or past 96 rows, 32 with native
    bf16 math, on the GEMM from dequantized blocks) and PyTorch's compute the same layer."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 256, generator=gen)
    q, sz = quantize_int4(w, 64)
    ours = int4_linear(layer_with(w), 1, q, sz.to(dtype), 64, Scratch())
    assert isinstance(ours, CpuLinear) and ours.weight.dtype == torch.uint8 and ours.weight.shape == (96, 128)
    theirs = Int4Linear(layer_with(w), 1, q, sz.to(dtype), group_size=64)
    for rows in (1, 8, 20, 120):  # the kernel's largest batch, and prompts
        x = torch.randn(rows, 256, generator=gen).to(dtype)
        with torch.inference_mode():
            out, reference = ours(x).float(), theirs(x).float()
        # fp32: the kernel rounds x to int16 steps of 2^-15 of each 256 columns' largest; bf16: the outputs' rounding
        tol = 1e-4 if dtype == torch.float32 else 2**-7
        assert (out - reference).abs().max() <= tol * reference.abs().max(), rows


def logit_errors(exact: torch.Tensor, approx: torch.Tensor) -> tuple:
    """(relative RMS error, mean KL(exact || approx), top-1 agreement) of approx's logits against exact's."""
    rel_rms = ((approx - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
    log_p, log_q = torch.log_softmax(exact, -1), torch.log_softmax(approx, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    top1 = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    return rel_rms, kl, top1


# int4 in groups of 32 (PyTorch's kernel) and 64 (ours; gqa's FFN of 224 features does not split in groups of 64)
@pytest.mark.parametrize("config,mode,group_size", [("mha", "int8", 128), ("gqa", "int8", 128), ("mha", "int4", 32),
                                                    ("gqa", "int4", 32), ("mha", "int4", 64)])
def test_quantized_model_tracks_fp32(build, device, config, mode, group_size):
    """(int4 on CUDA runs in bf16, whose rounding, ~1e-2 relative, is well inside int4's bounds.)"""
    exact_model = build(config).model
    model = build(config, quantize=mode, group_size=group_size, dtype=model_dtype(device, mode)).model
    kind = mode if mode == "int8" else f"{mode}/{group_size}"
    assert isinstance(model.layers[1].feed_forward.w2, linear_class(device, kind))
    assert isinstance(model.output, linear_class(device, kind))
    tokens = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.inference_mode():
        exact, prefilled = exact_model.forward(tokens, 0), model.forward(tokens, 0).float()  # the prompt path
        model.forward(tokens[:, :16], 0)  # and decoding, one position at a time (the int8 CPU kernel's path)
        decoded = torch.cat([model.forward(tokens[:, pos : pos + 1], pos) for pos in range(16, 32)], dim=1).float()
    max_rel_rms, max_kl, min_top1 = BOUNDS[mode]
    for approx, reference in ((prefilled, exact), (decoded, exact[:, 16:])):
        rel_rms, kl, top1 = logit_errors(reference, approx)
        assert rel_rms < max_rel_rms and kl < max_kl and top1 >= min_top1, (rel_rms, kl, top1)


def test_quantized_generation_api_is_unchanged(build):
    generator = build("gqa", quantize="int8")
    out = generator.text_completion(["hello world"], temperature=0, max_gen_len=4, logprobs=True)
    assert sorted(out[0]) == ["finish_reason", "generation", "logprobs", "tokens"] and len(out[0]["tokens"]) == 4
    chat = generator.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=3)
    assert chat[0]["generation"]["role"] == "assistant"


def test_bad_quantize_arguments(build, device, tiny_dir, tokenizer_path):
    host = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'; valid modes: int8, int4"):
        linear_factory(host, torch.float32, 1, quantize="int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        linear_factory(host, torch.float32, 1, quantize="int4", group_size=48)
    assert supported_quantize_modes(torch.device("mps"), torch.float16) == ("int8",)
    with pytest.raises(ValueError, match="no kernel on mps .* this device supports: int8"):
        linear_factory(torch.device("mps"), torch.float16, 1, quantize="int4")
    with pytest.raises(ValueError, match="group_size=128 does not divide layers.0.attention.wqkv's 64 input features"):
        build("mha", quantize="int4", group_size=128, dtype=model_dtype(device, "int4"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prequantized_checkpoint_loads_like_quantizing_at_load_time(build, device, tiny_dir, tokenizer_path, tmp_path,
                                                                    mode):
    from llama import Llama
    from llama.convert import quantize

    # int4 in groups of 64, which our kernel takes (mha's layers split into them)
    config, group_size, kind = ("gqa", 32, "int8") if mode == "int8" else ("mha", 64, "int4/64")
    src, dst = tiny_dir / f"{config}-mp1", tmp_path / f"{config}-{mode}"
    quantize(str(src), str(dst), mode=mode, group_size=group_size)
    files = sorted(p.name for p in dst.iterdir())
    assert files == ["checklist.chk", "consolidated.00.pth", "params.json", "quantization.json", "tokenizer.model"]
    assert (dst / "consolidated.00.pth").stat().st_size < 0.5 * (src / "consolidated.00.pth").stat().st_size
    assert "quantization.json" in (dst / "checklist.chk").read_text()

    dtype = model_dtype(device, mode)
    stored = Llama.build(str(dst), tokenizer_path, 64, 4, device=str(device), dtype=dtype).model
    at_load = build(config, quantize=mode, group_size=group_size, dtype=dtype).model
    assert isinstance(stored.output, linear_class(device, kind))
    tokens = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.inference_mode():
        got, expected = stored.forward(tokens, 0), at_load.forward(tokens, 0)
    if dtype == "fp32":
        assert torch.equal(got, expected)
    else:  # int4 on CUDA: quantizing at load time sees bf16-rounded weights, the file saw fp32: a few codes differ
        assert logit_errors(expected.float(), got.float())[0] < 0.05


def test_prequantized_checkpoint_errors(tiny_dir, tokenizer_path, tmp_path):
    from llama import Llama
    from llama.convert import quantize, to_hf

    with pytest.raises(ValueError, match="unknown mode 'int2'; valid modes: int8, int4"):
        quantize(str(tiny_dir / "mha-mp1"), str(tmp_path / "x"), mode="int2")
    dst = tmp_path / "mha-mp2-int8"
    quantize(str(tiny_dir / "mha-mp2"), str(dst), mode="int8")
    assert sorted(p.name for p in dst.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    with pytest.raises(ValueError, match="pre-quantized as int8 .* but quantize='int4'"):
        Llama.build(str(dst), tokenizer_path, 64, 4, device="cpu", dtype="fp32", quantize="int4")
    with pytest.raises(ValueError, match="pre-quantized checkpoint, which Hugging Face's format cannot hold"):
        to_hf(str(dst), str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="already quantized \\(int8\\)"):
        quantize(str(dst), str(tmp_path / "again"), mode="int4")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "again").exists()
    # shards that disagree on a layer's int8 scales (as per-shard quantization wrote them) are refused, not joined
    shard = load_shard(str(dst / "consolidated.01.pth"))
    shard = {k: v.clone() for k, v in shard.items()}
    shard["layers.0.attention.wo.scales"] *= 2
    torch.save(shard, dst / "consolidated.01.pth")
    with pytest.raises(ValueError, match="different int8 scales for layers.0.attention.wo.scales"):
        Llama.build(str(dst), tokenizer_path, 64, 4, device="cpu", dtype="fp32")


@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32)])
def test_prequantized_checkpoint_reshards_and_loads_on_any_process_count(tiny_dir, tokenizer_path, device, tmp_path,
                                                                         mode, group_size):
    """Quantized from 2 shards, resharded to 1 and back to 2: the shards come back bit-exact, and one process
    loading the 2-shard checkpoint computes exactly what it computes from the 1-shard one."""
    from llama import Llama
    from llama.convert import quantize, reshard

    two, one, again = tmp_path / "two", tmp_path / "one", tmp_path / "again"
    quantize(str(tiny_dir / "mha-mp2"), str(two), mode=mode, group_size=group_size)
    reshard(str(two), str(one), model_parallel_size=1)
    reshard(str(one), str(again), model_parallel_size=2)
    assert (one / "quantization.json").read_text() == (two / "quantization.json").read_text()
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        a, b = load_shard(str(two / name)), load_shard(str(again / name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    if mode == "int4":  # wo's 64 input features are 2 groups of 32: not split whole among 4 processes
        with pytest.raises(ValueError, match="int4 in groups of 32: layers.0.attention.wo.weight's 64 input features"):
            reshard(str(one), str(tmp_path / "four"), model_parallel_size=4)
        assert not (tmp_path / "four").exists()
    tokens = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(6)).to(device)
    logits = []
    for ckpt in (two, one):
        model = Llama.build(str(ckpt), tokenizer_path, 64, 4, device=str(device), dtype=model_dtype(device, mode)).model
        with torch.inference_mode():
            logits.append(model.forward(tokens, 0))
    assert torch.equal(logits[0], logits[1])


RESIDENT_AFTER_FIRST_STEP = """
import sys, torch
from llama import Llama
def resident():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
before = resident()
generator = Llama.build(sys.argv[1], sys.argv[2], max_seq_len=32, max_batch_size=1, dtype="bf16",
                        quantize=sys.argv[3] if len(sys.argv) > 3 else None)
with torch.inference_mode():
    generator.model.forward(torch.tensor([[1, 2, 3]]), 0)  # every weight read once: mapped pages resident too
print(resident() - before)
"""


@pytest.mark.cpu_only("measures the host memory of CPU builds")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_int8_build_holds_at_most_0_6x_the_memory_of_bf16(tmp_path, tokenizer_path):
    # ~150 MB of bf16 weights with a negligible embedding: int8 halves the linears, so ~0.5x is expected, and the
    # conversion's freed temporaries, which glibc kept resident until they were released (1.2x and 2.3x in two runs
    # without that), would show
    params = {"dim": 1024, "n_layers": 6, "n_heads": 8, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}
    make_checkpoint(str(tmp_path / "ckpt"), params, TOKENIZER_VOCAB, dtype=torch.bfloat16)
    grown = {}
    for mode in ("bf16", "int8"):
        args = [sys.executable, "-c", RESIDENT_AFTER_FIRST_STEP, str(tmp_path / "ckpt"), tokenizer_path]
        out = subprocess.run(args + ([mode] if mode != "bf16" else []), capture_output=True, text=True, check=True)
        grown[mode] = int(out.stdout.split()[-1])
    assert grown["int8"] <= 0.6 * grown["bf16"], grown
