"""Inference linears swapped in after loading compute what fairscale's layers compute, and the fused projections
keep Meta's state-dict keys."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama.kernels import cpu
from llama.formats.base import load_shard
from llama.linear import CpuLinear, Scratch, int8_linear
from llama.quantize import quantize_int8
from llama.engine import CpuDecodeEngine
from llama.model import column_parallel, row_parallel

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")
pytestmark = pytest.mark.cpu_only("the CPU kernels' linears and decode engine")


def layer_with(weight: torch.Tensor):
    layer = column_parallel(weight.shape[1], weight.shape[0])
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


@pytest.fixture(autouse=True)
def model_parallel(build):
    build("mha")  # fairscale's layers need its (one-process) model-parallel group


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 64, 200])
@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("quantized", [False, True])
def test_cpu_linear_matches_f_linear(rows, native_bf16, quantized, monkeypatch):
    monkeypatch.setattr(Scratch, "BLOCK_NUMEL", 40 * 64)  # 40 of 96 rows per block: the prefill route in 3 blocks
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(2, rows, 64, generator=gen).bfloat16()
    if quantized:
        q, scales = quantize_int8(weight)
        linear = CpuLinear(layer_with(weight), 1, q, scales.bfloat16(), Scratch())
        reference = F.linear(x.float(), q.float()) * scales.bfloat16().float()
    else:
        linear = CpuLinear(layer_with(weight), 1, weight, None, Scratch())
        reference = F.linear(x.float(), weight.float())  # exact products of the bf16 values, summed in fp32
    linear.native_bf16 = native_bf16
    with torch.inference_mode():
        out = linear(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, 96)
    # 2 rows x `rows` of x: up to a decode step's take the kernel; more take its tiles, or the widened-weight GEMM
    # (past 32 rows of bf16 weights or 96 of int8 ones; with native bf16 math past 8 and 32): all sum exact products
    # in fp32, so only the final rounding to bf16 differs. With native bf16 math the GEMM runs in bf16 from a weight
    # rounded to bf16.
    kernel_rows = {(False, False): 32, (False, True): 8, (True, False): 96, (True, True): 32}[quantized, native_bf16]
    assert linear.uses_kernel(rows * 2) == (rows * 2 <= kernel_rows)
    bf16_gemm = rows * 2 > kernel_rows and native_bf16
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=(2**-5 if bf16_gemm else 2**-7) * 4)


def test_native_bf16_follows_pytorchs_isa():
    """PyTorch held below AVX-512 (ATEN_CPU_CAPABILITY) emulates bf16 even where the CPU has it: prompts then stay
    off bf16 GEMMs."""
    code = "from llama.linear import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False"


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address`, in KiB (Linux's /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: start-end perms offset dev inode
                start, end = (int(a, 16) for a in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1])
    raise ValueError(f"no mapping holds {address:#x}")


@needs_kernels
def test_int8_kernel_weights_move_to_huge_pages():
    gen = torch.Generator().manual_seed(0)
    q, scales = quantize_int8(torch.randn(1024, 4096, generator=gen))  # 4 MiB of int8: two huge pages
    linear = int8_linear(layer_with(q), 1, q, scales.bfloat16(), Scratch())
    assert torch.equal(linear.weight, q) and linear.weight.is_contiguous()
    small = torch.zeros(10)
    assert cpu.huge_page_copy(small) is small  # under one huge page: left where it is
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[never]" in thp:
        pytest.skip("transparent huge pages are disabled")
    assert linear.weight.data_ptr() % cpu.HUGE_PAGE == 0
    assert anon_huge_kib(linear.weight.data_ptr()) >= 4096


@needs_kernels
def test_build_puts_the_cpu_kernels_behind_the_ops(build):
    build("mha")
    for op in ("llama::rms_norm", "llama::attention", "llama::cpu_matmul"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


@needs_kernels
def test_bf16_cpu_build_uses_kernels_and_tracks_fp32(build):
    fp32, bf16 = build("gqa").model, build("gqa", dtype="bf16").model
    assert isinstance(bf16.layers[0].attention.wqkv, CpuLinear)
    assert isinstance(bf16.output, CpuLinear) and bf16.output.weight.dtype == torch.bfloat16
    tokens = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        exact = fp32.forward(tokens, 0)
        approx = bf16.forward(tokens, 0)  # 80 rows: the widened-weight GEMM
        step = bf16.forward(tokens[:, -1:], 39)  # 2 rows: the streaming kernel, against the prefilled cache
    scale = exact.abs().max().item()
    assert (approx - exact).abs().max().item() < 0.025 * scale  # measured ~0.01
    assert (step[:, 0] - exact[:, -1]).abs().max().item() < 0.025 * scale
    top1 = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert top1 > 0.9


@needs_kernels
@pytest.mark.parametrize("config,dtype,quantize", [("gqa", "bf16", None), ("gqa", "bf16", "int8"), ("gqa", "fp32", "int8"),
                                                   ("mha", "bf16", "int4"), ("mha", "fp32", "int4")])
def test_cpu_decode_engine_matches_the_model(build, config, dtype, quantize):
    """The CPU decode engine runs a step through every block in one kernel call, with the ops and the roundings the
    blocks' own forward uses: its logits match the model's forward, for rows at different positions and in other
    cache rows. (int4 in groups of 64: mha's layers all fit the int4 kernel.)"""
    generator = build(config, dtype=dtype, quantize=quantize, group_size=64, max_batch_size=3)
    model, engine = generator.model, generator.engine
    assert isinstance(engine, CpuDecodeEngine)
    tokens = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(4))
    start, rows = torch.tensor([11, 7, 9]), torch.tensor([2, 0, 1])
    step = tokens[torch.arange(3), start][:, None]
    # Only SiLU's exp (C's, PyTorch's) should differ, by an ulp; before int8 or int4 weights an ulp can move an
    # activation's int16 rounding by a step: the likely cause of the 9e-5 seen with PyTorch's AVX-512 ops (int4).
    tol = dict(rtol=0, atol=(1e-5 if quantize is None else 2e-4) if dtype == "fp32" else 2e-2)
    with torch.inference_mode():
        model.forward(tokens, 0)
        torch.testing.assert_close(engine(step, start), model.forward(step, start), **tol)
        model.forward(tokens, 0, rows=rows)  # the same prompts in rows 2, 0, 1
        torch.testing.assert_close(engine(step, start, rows), model.forward(step, start, rows), **tol)
        with pytest.raises(ValueError, match="takes tokens \\(B, 1\\) for 1 <= B <= 3"):
            engine(tokens[:, :2], start)
        with pytest.raises(RuntimeError, match="a position is outside the cache"):
            engine(step, torch.tensor([11, 7, 64]))
        with pytest.raises(RuntimeError, match="a token id is outside the vocabulary"):
            engine(torch.tensor([[3], [model.params.vocab_size], [5]]), start)


@needs_kernels
def test_cpu_decode_engine_takes_more_sequences_than_a_decode_steps_matmul(build):
    """Past cpu.DECODE_ROWS sequences the engine's matmuls run in tiles: a step of 11 rows, each at its own
    position, gives the model's logits."""
    generator = build("gqa", dtype="bf16", max_batch_size=11)
    model, engine = generator.model, generator.engine
    assert engine.max_batch == 11
    tokens = torch.randint(3, 500, (11, 12), generator=torch.Generator().manual_seed(6))
    start = torch.arange(11) % 5 + 6
    step = tokens[torch.arange(11), start][:, None]
    with torch.inference_mode():
        model.forward(tokens, 0)
        torch.testing.assert_close(engine(step, start), model.forward(step, start), rtol=0, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("native_bf16", [True, False])
def test_decode_steps_past_the_kernels_rows_run_the_models_forward(build, monkeypatch, native_bf16):
    """A decode step of more sequences than the linears' kernels take (bf16 weights with native bf16 math: more than
    8) runs the model's forward, whose GEMM is faster; fewer run the engine. Without native bf16 math 11 still fit."""
    generator = build("gqa", dtype="bf16", max_batch_size=11)
    for module in generator.model.modules():
        if isinstance(module, CpuLinear):
            module.native_bf16 = native_bf16
    batches = []  # of the steps the engine ran
    engine_step = CpuDecodeEngine.__call__

    def counted_step(engine, tokens, *args):
        batches.append(len(tokens))
        return engine_step(engine, tokens, *args)

    monkeypatch.setattr(CpuDecodeEngine, "__call__", counted_step)
    tokens = torch.randint(3, 500, (11, 1), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        for bsz in (11, 8):
            logits = generator.decode(tokens[:bsz], torch.full((bsz,), 5), None, 6)
            assert logits.shape == (bsz, 1, generator.model.params.vocab_size)
    assert batches == ([8] if native_bf16 else [11, 8])


@needs_kernels
def test_cpu_decode_engine_reads_the_models_own_tensors(build):
    """The engine points at the model's tensors: a weight changed in place is used at once, replaced caches are
    refused. It is made only for models whose every linear it can run: a plain fairscale linear (PyTorch's matmul)
    in a block means no engine."""
    generator = build("gqa", dtype="bf16", max_batch_size=1)
    model, engine = generator.model, generator.engine
    tokens = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(5))
    start = torch.tensor([7])
    with torch.inference_mode():
        model.forward(tokens[:, :-1], 0)
        before = engine(tokens[:, -1:], start)
        wo = model.layers[0].attention.wo.weight
        saved = wo.clone()
        try:
            wo.zero_()
            after = engine(tokens[:, -1:], start)
            expected = model.forward(tokens[:, -1:], start)
        finally:
            wo.copy_(saved)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=2e-2)
    model.setup_caches(1, 64)  # new caches: the engine's pointers would be stale, so it refuses
    with pytest.raises(RuntimeError, match="KV caches were replaced"):
        engine(tokens[:, -1:], start)
    generator.engine = CpuDecodeEngine.for_model(model)
    w2 = model.layers[1].feed_forward.w2
    plain = row_parallel(w2.in_features, w2.out_features)
    plain.weight = torch.nn.Parameter(w2.weight, requires_grad=False)
    model.layers[1].feed_forward.w2 = plain
    try:
        assert CpuDecodeEngine.for_model(model) is None
    finally:
        model.layers[1].feed_forward.w2 = w2


def test_state_dict_keeps_meta_keys(build, tiny_dir):
    """wq/wk/wv and w1/w3 run fused, but state_dict() gives back exactly the checkpoint's tensors and names."""
    model = build("gqa", shards=1).model
    meta = load_shard(str(tiny_dir / "gqa-mp1" / "consolidated.00.pth"))
    state = model.state_dict()
    assert sorted(state) == sorted(k for k in meta if k != "rope.freqs")
    for key, tensor in state.items():
        assert torch.equal(tensor, meta[key].float()), key
    model.load_state_dict(state)  # and loads back through the same keys


def test_without_kernels_build_falls_back_to_pytorch(tiny_dir, tokenizer_path, build):
    """No compiler (LLAMA_NO_CPU_KERNELS here): a warning, PyTorch's matmuls, the same greedy tokens."""
    script = (
        "import warnings, torch\n"
        "from llama import Llama\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    g = Llama.build({str(tiny_dir / 'mha-mp1')!r}, {tokenizer_path!r}, 64, 1, device='cpu', dtype='fp32',"
        " quantize='int8')\n"
        "print(type(g.model.output).__name__, any('kernels disabled' in str(w.message) for w in caught))\n"
        "print(g.generate([[1, 5, 9, 14]], max_gen_len=6, temperature=0)[0][0])\n"
    )
    env = {**os.environ, "LLAMA_NO_CPU_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    kind, tokens = out.stdout.strip().splitlines()[-2:]
    assert kind == "Int8Linear True"
    if cpu.available():
        expected = build("mha", max_batch_size=1, quantize="int8").generate([[1, 5, 9, 14]], 6, temperature=0)
        assert tokens == str(expected[0][0])
