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
from llama.quantize import quantize_int4, quantize_int8
from llama import ops
from llama.config import ModelArgs
from llama.engine import CpuDecodeEngine
from llama.model import column_parallel, rotary_angles, row_parallel

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")


def layer_with(weight: torch.Tensor):
    layer = column_parallel(weight.shape[1], weight.shape[0])
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


@pytest.fixture(autouse=True)
def model_parallel(build):
    build("mha")  # fairscale's layers need its (one-process) model-parallel group


def as_int8_kernel_rounds(x: torch.Tensor) -> torch.Tensor:
    """x (fp32) as the int8 kernel of an AVX-512 build multiplies it: the first K - K % 32 columns rounded to int16
    steps of 1/32767 of the largest |x| in each block of 256 of them; the rest exact."""
    if not cpu.library().llama_vectorized():
        return x
    k_end = x.shape[-1] - x.shape[-1] % 32
    out = x.clone()
    for start in range(0, k_end, 256):
        block = x[..., start : min(start + 256, k_end)]
        largest = block.abs().amax(-1, keepdim=True)
        inverse = torch.full_like(largest, 32767) / largest  # (not 32767 / largest: that multiplies by 1 / largest)
        out[..., start : start + block.shape[-1]] = torch.round(block * inverse) * (largest / 32767)
    return out


@needs_kernels
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features", [70, 600])
def test_kernel_matches_fp32_matmul(act_dtype, in_features):
    # N = 37 leaves rows after the last full block of 8/4/2; K = 70 and 600 leave tails after the last 16- or
    # 32-wide vector, and 600 spans three blocks of int16 activations (256, 256, 64)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, in_features, generator=gen).bfloat16()
    q, scales = quantize_int8(torch.randn(37, in_features, generator=gen))
    scales = scales.to(act_dtype)
    for rows in range(1, cpu.max_rows() + 1):
        x = torch.randn(rows, in_features, generator=gen).to(act_dtype)
        out = cpu.matmul(x, weight)
        assert out.dtype == act_dtype and out.shape == (rows, 37)
        # exact products summed in fp32: only summation order and the final rounding to act_dtype may differ
        tol = dict(rtol=2**-7, atol=1e-2) if act_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), **tol)
        # int8: the references in fp64, as the kernel's integer sums are exact
        out8 = cpu.matmul(x, q, scales).double()
        exact = F.linear(x.double(), q.double()) * scales.double()
        rounded = F.linear(as_int8_kernel_rounds(x.float()).double(), q.double()) * scales.double()
        torch.testing.assert_close(out8, rounded, **tol)
        # the int16 rounding of activations moves outputs by ~1e-5 of their scale: far below int8's own error
        rounding = 0 if act_dtype == torch.float32 else 2**-8  # the output's own, in bf16
        assert (out8 - exact).abs().max() <= (1e-4 + rounding) * exact.abs().max()


def frequencies(head_dim: int) -> torch.Tensor:
    return ModelArgs(dim=head_dim, n_heads=1).rotary_frequencies()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
# head sizes with vector code (16, 32, 64, 128 (Llama 2's): 16 positions scored at a time, so pos 37 ends in a
# partial block) and without (24); 3 query heads on the one KV head of one sequence are split between threads
@pytest.mark.parametrize("head_dim, pos, bsz, n_heads, n_kv_heads",
                         [(16, 6, 2, 4, 2), (32, 20, 2, 4, 2), (64, 37, 2, 4, 2), (128, 37, 2, 4, 2), (24, 6, 2, 4, 2),
                          (64, 37, 1, 3, 1), (24, 6, 1, 3, 1)])
@pytest.mark.parametrize("rows", [None, "reversed"])
def test_rms_norm_and_decode_attention_kernels_match_the_references(dtype, head_dim, pos, bsz, n_heads, n_kv_heads,
                                                                    rows):
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(3, 5, 80, generator=gen).to(dtype), torch.rand(80, generator=gen).to(dtype)
    reference = ops.rms_norm_reference(x, weight, 1e-5).float()
    tol = dict(rtol=2**-7, atol=2**-7) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.rms_norm(x, weight, 1e-5).float(), reference, **tol)

    # bsz sequences, each at its own position (pos, pos - 5, ...), in a cache for 3 with 2 more slots; with rows,
    # in cache rows 2, 1, ... instead of 0, 1, ...
    slots = pos + 2
    cache_k, cache_v = (torch.randn(3, n_kv_heads, slots, head_dim, generator=gen).to(dtype) for _ in range(2))
    qkv = torch.randn(bsz, 1, (n_heads + 2 * n_kv_heads) * head_dim, generator=gen).to(dtype)
    start = torch.tensor([pos - 5 * b for b in range(bsz)])
    cache_rows = None if rows is None else torch.tensor([2 - b for b in range(bsz)])
    rotation = rotary_angles(start[:, None], frequencies(head_dim))
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    expected = ops.attention_reference(qkv, ref_k, ref_v, rotation, start, cache_rows, n_heads, slots)
    out = cpu.attention(qkv, cache_k, cache_v, rotation, start, cache_rows, n_heads, slots)
    torch.testing.assert_close(cache_k, ref_k, **tol)  # rotated k and v written at pos, rounded as torch rounds
    torch.testing.assert_close(cache_v, ref_v, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    with pytest.raises(RuntimeError, match="a position is outside the cache"):  # refused, not written
        cpu.attention(qkv, cache_k, cache_v, rotation, start + 2, cache_rows, n_heads, slots)
    with pytest.raises(RuntimeError, match="a cache row is out of range"):
        cpu.attention(qkv, cache_k, cache_v, rotation, start, torch.full((bsz,), 3), n_heads, slots)
    torch.testing.assert_close(cache_k, ref_k, **tol)


@needs_kernels
def test_decode_attention_softmax_is_accurate_to_fp32():
    """Integer queries and keys make the scores q.k / 8 exact, and v_t = e_(t mod 64) makes each output a sum of
    softmax probabilities: what remains is the error of exp and of the sums, a few ulp (an exp 1e-5 off fails)."""
    gen = torch.Generator().manual_seed(0)
    n_heads, n_kv_heads, head_dim, pos = 4, 2, 64, 150
    cache_k = torch.randint(-3, 4, (1, n_kv_heads, pos + 1, head_dim), generator=gen).float()
    cache_v = torch.eye(head_dim).repeat(1, n_kv_heads, 3, 1)[:, :, : pos + 1].contiguous()
    qkv = torch.randint(-3, 4, (1, 1, (n_heads + 2 * n_kv_heads) * head_dim), generator=gen).float()
    qkv[..., n_heads * head_dim:] = torch.cat([cache_k[0, :, pos].flatten(), cache_v[0, :, pos].flatten()])
    no_rotation = rotary_angles(torch.tensor([[0]]), frequencies(head_dim))  # keeps q and k exact
    out = cpu.attention(qkv, cache_k, cache_v, no_rotation, torch.tensor([pos]), None, n_heads, pos + 1)
    q = qkv[0, 0, : n_heads * head_dim].view(n_kv_heads, n_heads // n_kv_heads, head_dim).double()
    probabilities = torch.softmax(q @ cache_k[0].double().transpose(-1, -2) / 8, dim=-1)
    expected = (probabilities @ cache_v[0].double()).reshape(1, 1, -1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-30)


@needs_kernels
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_features, in_features, group", [(37, 128, 64), (40, 640, 128), (16, 512, 256)])
def test_int4_kernel_matches_dequantized_matmul(act_dtype, out_features, in_features, group):
    gen = torch.Generator().manual_seed(0)
    q, scales_and_zeros = quantize_int4(torch.randn(out_features, in_features, generator=gen), group)
    packed = cpu.pack_int4(q)
    assert packed.shape == (out_features, in_features // 2) and torch.equal(cpu.unpack_int4(packed), q.byte())
    scales_zeros = scales_and_zeros.transpose(0, 1).to(act_dtype)  # (N, K / group, 2), as CpuLinear keeps them
    scales, zeros = (t.double().repeat_interleave(group, dim=1) for t in scales_zeros.unbind(-1))
    for rows in range(1, cpu.max_rows() + 1):
        x = torch.randn(rows, in_features, generator=gen).to(act_dtype)
        out = cpu.matmul(x, packed, scales_zeros.contiguous(), group)
        assert out.dtype == act_dtype and out.shape == (rows, out_features)
        # weight = (code - 8) * scale + zero: the codes meet x rounded as the int8 kernel rounds it (to int16), in
        # exact integer sums; the zeros meet x itself
        rounded = as_int8_kernel_rounds(x.float()).double()
        expected = rounded @ ((q.double() - 8) * scales).t() + x.double() @ zeros.t()
        tol = dict(rtol=2**-7, atol=1e-2) if act_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.double(), expected, **tol)
    with pytest.raises(RuntimeError, match="int4 groups must be 64, 128 or 256 wide"):
        cpu.matmul(x[:, :128], packed[:, :64], scales_zeros, 32)


@needs_kernels
def test_kernel_refuses_too_many_rows():
    with pytest.raises(RuntimeError, match="takes 1 to 8 rows"):
        cpu.matmul(torch.zeros(9, 16), torch.zeros(4, 16, dtype=torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 64])
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
    # rows * 2 <= 8 take the kernel, more the widened-weight GEMM: both sum exact products in fp32, so only the
    # final rounding to bf16 differs. With native bf16 math the GEMM runs in bf16 from a weight rounded to bf16.
    bf16_gemm = rows * 2 > 8 and native_bf16
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=(2**-5 if bf16_gemm else 2**-7) * 4)


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
    tol = dict(rtol=0, atol=1e-5 if dtype == "fp32" else 2e-2)  # only SiLU's exp (C's, PyTorch's) may differ
    with torch.inference_mode():
        model.forward(tokens, 0)
        torch.testing.assert_close(engine(step, start), model.forward(step, start), **tol)
        model.forward(tokens, 0, rows=rows)  # the same prompts in rows 2, 0, 1
        torch.testing.assert_close(engine(step, start, rows), model.forward(step, start, rows), **tol)
        with pytest.raises(ValueError, match="takes tokens \\(B, 1\\) for 1 <= B <= 3"):
            engine(tokens[:, :2], start)
        with pytest.raises(RuntimeError, match="a position is outside the cache"):
            engine(step, torch.tensor([11, 7, 64]))


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


def test_portable_kernels_match_fp32_matmul(tmp_path):
    """The plain C++ loops that CPUs without AVX-512 run (built here with -O3 alone) compute the same products."""
    script = (
        "import torch, torch.nn.functional as F\n"
        "from llama.kernels import cpu\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w = torch.randn(37, 70, generator=g).bfloat16(); x = torch.randn(3, 70, generator=g)\n"
        "q = torch.randint(-127, 128, (37, 70), dtype=torch.int8, generator=g); s = torch.rand(37, generator=g)\n"
        "torch.testing.assert_close(cpu.matmul(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-4)\n"
        "torch.testing.assert_close(cpu.matmul(x, q, s), F.linear(x, q.float()) * s, rtol=1e-5, atol=1e-3)\n"
        "codes = torch.randint(0, 16, (37, 128), generator=g); sz = torch.rand(37, 2, 2, generator=g)\n"
        "w4 = (codes - 8) * sz[..., 0].repeat_interleave(64, 1) + sz[..., 1].repeat_interleave(64, 1)\n"
        "x = torch.randn(3, 128, generator=g)\n"
        "out = cpu.matmul(x, cpu.pack_int4(codes), sz, 64)\n"
        "torch.testing.assert_close(out, F.linear(x, w4), rtol=1e-5, atol=1e-4)\n"
        "print(cpu.available(), cpu.library().llama_vectorized())\n"
    )
    env = {**os.environ, "LLAMA_KERNEL_CACHE": str(tmp_path), "LLAMA_KERNEL_FLAGS": "-O3 -fopenmp"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if "False" in out.stdout:
        pytest.skip("no C++ compiler")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "0"]  # built without AVX-512: the portable loops ran


def test_kernels_build_into_cache_atomically(tmp_path):
    """The library is compiled once into LLAMA_KERNEL_CACHE under a content-hashed name, with no temporary left."""
    script = "from llama.kernels import cpu; print(cpu.available())"
    env = {**os.environ, "LLAMA_KERNEL_CACHE": str(tmp_path)}
    for _ in range(2):  # the second run reuses the first's build
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    if out.stdout.strip() != "True":
        pytest.skip("no C++ compiler")
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("cpu-") and files[0].endswith(".so")
