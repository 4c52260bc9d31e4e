"""The CPU kernels of llama/kernels/cpu.cpp against PyTorch references, in the build for this CPU and, through
subprocesses, in every other build this machine can run: the AVX2 and portable builds on an AVX-512 CPU, and the
NEON builds, cross-compiled and run under qemu-aarch64 with the C++ driver tests/kernels_check.cpp."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama import ops
from llama.config import ModelArgs
from llama.kernels import cpu
from llama.model import rotary_angles
from llama.quantize import quantize_int4, quantize_int8

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")
pytestmark = pytest.mark.cpu_only("the CPU kernels")
HERE = os.path.dirname(os.path.abspath(__file__))


def as_int8_kernel_rounds(x: torch.Tensor) -> torch.Tensor:
    """x (fp32) as the int8 and int4 kernels multiply it (in every build): the first K - K % 32 columns rounded to
    int16 steps of 1/32767 of the largest |x| in each block of 256 of them; the rest exact."""
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
@pytest.mark.parametrize("out_features, in_features", [(37, 70), (37, 600), (300, 600)])
def test_kernel_matches_fp32_matmul(act_dtype, out_features, in_features):
    # N = 37 leaves rows after the last full block of 8/4/2, and 300 makes three panels of weights for the tiles of
    # more rows than a decode step's; K = 70 and 600 leave tails after the last 16- or 32-wide vector, and 600 spans
    # three blocks of int16 activations (256, 256, 64)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=gen))
    scales = scales.to(act_dtype)
    for rows in [*range(1, cpu.DECODE_ROWS + 1), 9, 13, 37]:  # a decode step's rows, then tiles of more
        x = torch.randn(rows, in_features, generator=gen).to(act_dtype)
        out = cpu.matmul(x, weight)
        assert out.dtype == act_dtype and out.shape == (rows, out_features)
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
    for rows in [*range(1, cpu.DECODE_ROWS + 1), 9, 13, 37]:  # a decode step's rows, then tiles of more
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


# The builds of each instruction set for this machine's architecture: the -march that selects it, and the flags of
# /proc/cpuinfo a CPU needs to run it.
BUILDS = {
    "x86_64": {"avx512-bf16": ("-march=cooperlake", {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}),
               "avx512": ("-march=skylake-avx512", {"avx512f", "avx512bw", "avx512vl"}),
               "avx2": ("-march=haswell", {"avx2", "fma", "f16c"}),
               "portable": ("-march=x86-64", set())},
    "aarch64": {"neon-bf16": ("-march=armv8.6-a", {"asimddp", "bf16"}),
                "neon-dotprod": ("-march=armv8.2-a+dotprod", {"asimddp"}), "neon": ("-march=armv8-a", set()),
                "portable": ("-march=armv8-a+nosimd", set())},
}


@needs_kernels
@pytest.mark.parametrize("isa", ["avx512-bf16", "avx512", "avx2", "neon-bf16", "neon-dotprod", "neon", "portable"])
def test_every_build_this_cpu_runs_passes_these_tests(isa, tmp_path):
    builds = BUILDS.get(platform.machine(), {})
    if isa not in builds:
        pytest.skip(f"no {isa} build for {platform.machine()}")
    march, needs = builds[isa]
    missing = needs - set(cpu.cpu_flags().split())
    if missing:
        pytest.skip(f"this CPU cannot run the {isa} build (it lacks {', '.join(sorted(missing))})")
    if cpu.isa() == isa:
        pytest.skip(f"{isa} is this run's own build")
    env = {**os.environ, "LLAMA_KERNEL_FLAGS": f"-O3 {march} -fopenmp", "LLAMA_KERNEL_CACHE": str(tmp_path)}
    built = subprocess.run([sys.executable, "-c", "from llama.kernels import cpu; print(cpu.isa())"],
                           capture_output=True, text=True, env=env, check=True)
    assert built.stdout.split()[-1] == isa
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                            "-k", "not every_build and not kernels_check"], capture_output=True, text=True, env=env)
    assert tests.returncode == 0, tests.stdout[-3000:]


def run_kernels_check(compiler: list, runner: list, tmp_path) -> str:
    """tests/kernels_check.cpp built with `compiler` and run through `runner`: its last line, after asserting that
    every check passed."""
    exe = str(tmp_path / "kernels_check")
    subprocess.run([*compiler, "-std=c++17", os.path.join(HERE, "kernels_check.cpp"), "-o", exe], check=True)
    out = subprocess.run([*runner, exe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_kernels_check_passes_on_this_cpu(tmp_path):
    """The C++ driver that checks the NEON build below, run in this CPU's own build (so that a fault of the driver
    shows on any machine)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    assert run_kernels_check([compiler, "-O2", "-march=native"], [], tmp_path).endswith(", 0 failed")


@pytest.mark.parametrize("isa", ["neon-bf16", "neon-dotprod", "neon"])
def test_neon_builds_pass_kernels_check_under_qemu(isa, tmp_path):
    """The NEON builds, with the BF16 extension (bf16 decode steps through bfdot) and the dot-product one, with the
    dot-product extension only (int8 and int4 through sdot), and with neither (smlal), cross-compiled and run under
    qemu-aarch64, whose default CPU has every extension."""
    if platform.machine() == "aarch64":
        pytest.skip("an ARM machine runs the NEON builds natively in the tests above")
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them)")
    march = BUILDS["aarch64"][isa][0]
    last = run_kernels_check([compiler, "-O2", march, "-static"], [qemu], tmp_path)
    assert last.startswith(f"{isa}: ") and last.endswith(", 0 failed")
