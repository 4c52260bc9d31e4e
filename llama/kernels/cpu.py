"""The kernels of cpu.cpp (streaming matmuls, RMSNorm, a decode step's attention, and a whole decode step in one call),
compiled for this CPU on first use (about 10 s of one core with the system's C++ compiler) and cached, then called through ctypes.
`register_kernels()` puts them behind the ops of llama/ops.py for CPU tensors. Without a compiler `available()` is
False, nothing is registered, and the model runs the ops' PyTorch references and PyTorch's matmuls, with a warning.

Each entry point and struct is declared once, in cpu.cpp's `extern "C"` block, which `declarations` reads to declare
them to ctypes; an entry point that fails returns a message, raised here as a RuntimeError.

The cache lives in $LLAMA_KERNEL_CACHE, else ~/.cache/llama; the file name hashes the source, the compiler command
and this CPU's flags, so an edit, a new compiler or another machine sharing the home directory gets its own build.
$CXX picks the compiler and $LLAMA_KERNEL_FLAGS replaces the flags tried: the flags choose the instruction set of the
kernels' vector code (AVX-512 with or without BF16, AVX2 with FMA, NEON with or without sdot, else portable loops;
`isa()` says which), e.g. "-O3 -march=haswell -fopenmp" builds the AVX2 kernels on an AVX-512 CPU.
"""

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Dict, Optional, Tuple

import torch

from llama import ops, runtime

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.cpp")
# Tried in order: tuned for this CPU with OpenMP threads, then plainer builds for compilers that refuse a flag.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-mcpu=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)


def cache_dir() -> str:
    return os.environ.get("LLAMA_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def compile_library(compiler: str, flags: list) -> Optional[str]:
    """Path of the shared library built with these flags (reusing a cached build), or None if they fail."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    command = [compiler, *flags, "-std=c++17", "-shared", "-fPIC"]
    key = hashlib.sha256(source + " ".join(command).encode() + cpu_flags().encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"cpu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    runtime.print_rank0(f"Compiling the CPU kernels for this CPU ({' '.join(flags)}; once, cached in {cache_dir()})",
                        file=sys.stderr, flush=True)
    # build under a temporary name and rename, so a concurrent process never loads a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        result = subprocess.run([*command, SOURCE, "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            return None
        os.replace(tmp, path)
        return path
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


C_TYPES = {"long": ctypes.c_long, "int": ctypes.c_int, "float": ctypes.c_float, "void": None}


def c_type(declared: str):
    """The ctypes type of a C declaration's type: pointers are addresses (c_void_p), `const char*` a message."""
    declared = declared.replace("const ", "").strip()
    if declared == "char*":
        return ctypes.c_char_p
    return ctypes.c_void_p if declared.endswith("*") else C_TYPES[declared]


@functools.lru_cache(maxsize=None)
def declarations() -> Tuple[Dict[str, tuple], Dict[str, type]]:
    """From cpu.cpp's `extern "C"` block: {entry point: (restype, argtypes)} and {struct name: ctypes.Structure}."""
    with open(SOURCE) as f:
        block = f.read().split('extern "C" {', 1)[1]
    structs = {}
    for name, body in re.findall(r"^struct (\w+) \{(.*?)^\};", block, re.M | re.S):
        fields = [(field, c_type(declared)) for declared, field in re.findall(r"^\s*([\w ]+\*?) (\w+);", body, re.M)]
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    functions = {}
    for restype, name, params in re.findall(r"^([\w ]+\*?) (llama_\w+)\(([^)]*)\) \{", block, re.M):
        argtypes = [c_type(param.rsplit(" ", 1)[0]) for param in re.split(r",\s*", params.strip()) if param]
        functions[name] = (c_type(restype), argtypes)
    return functions, structs


def struct(name: str) -> type:
    """The ctypes.Structure of cpu.cpp's struct `name`."""
    return declarations()[1][name]


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (with a warning) when no compiler can build them."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if os.environ.get("LLAMA_NO_CPU_KERNELS") or compiler is None:
        reason = "LLAMA_NO_CPU_KERNELS is set" if compiler else "no C++ compiler found (set CXX)"
        warnings.warn(f"llama: CPU decoding kernels disabled ({reason}); using PyTorch's slower matmuls")
        return None
    flag_sets = [os.environ["LLAMA_KERNEL_FLAGS"].split()] if os.environ.get("LLAMA_KERNEL_FLAGS") else FLAG_SETS
    for flags in flag_sets:
        try:
            path = compile_library(compiler, flags)
        except OSError:
            path = None
        if path is not None:
            break
    else:
        warnings.warn(f"llama: {compiler} could not build {SOURCE}; using PyTorch's slower CPU matmuls")
        return None
    # torch, imported above, has loaded its OpenMP runtime, so the library's libgomp.so.1 resolves to that one
    # and the kernels share PyTorch's thread pool and thread count.
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in declarations()[0].items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


def available() -> bool:
    return library() is not None


def check(error: Optional[bytes]) -> None:
    """Raise an entry point's error message, if it returned one."""
    if error is not None:
        raise RuntimeError(f"llama CPU kernel: {error.decode()}")


def isa() -> Optional[str]:
    """The instruction set the kernels were built for (avx512-bf16, avx512, avx2, neon-bf16, neon-dotprod, neon or
    portable), or None without kernels."""
    lib = library()
    return lib.llama_isa().decode() if lib is not None else None


# Rows of x up to which a matmul is a decode step's, each weight read once for every row (cpu.cpp's MAX_ROWS; more
# rows go in tiles).
DECODE_ROWS = 8


def act_bf16(x: torch.Tensor) -> int:
    """The kernels' activation-dtype flag: 1 for bf16, 0 for fp32 (the dtypes they take)."""
    return int(x.dtype == torch.bfloat16)


def matmul(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
           int4_group: int = 0) -> torch.Tensor:
    """x (..., K) in bf16 or fp32 @ W (N, K)^T -> (..., N) in x's dtype. The weight is bf16 (N, K); int8 (N, K)
    with scales (N,) in x's dtype; or, with int4_group, int4 codes packed by `pack_int4` (N, K / 2) with scales
    (N, K / int4_group, 2) of (scale, zero) in x's dtype. Every tensor on the CPU, weight contiguous. (Called once
    per linear per decode step: kept to the few tensor calls it needs.)"""
    n, k = weight.shape[0], x.shape[-1]
    x = x.contiguous()
    rows = x.numel() // k
    y = x.new_empty(x.shape[:-1] + (n,))
    if rows == 0:
        return y
    if scales is None:
        check(library().llama_matmul_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), act_bf16(x), rows, n, k))
    elif int4_group == 0:
        check(library().llama_matmul_int8(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                          act_bf16(x), rows, n, k))
    else:
        check(library().llama_matmul_int4(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                          act_bf16(x), rows, n, k, int4_group))
    return y


# The kernels' own ops, and their CPU implementations of llama/ops.py's (see register_kernels).
LIBRARY = torch.library.Library("llama", "FRAGMENT")
LIBRARY.define("cpu_matmul(Tensor x, Tensor weight, Tensor? scales, int int4_group) -> Tensor")
LIBRARY.impl("cpu_matmul", matmul, "CPU")  # an op, so that torch.compile places the kernel inside a compiled step


@torch.library.register_fake("llama::cpu_matmul", lib=LIBRARY)
def _(x, weight, scales, int4_group):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def int4_fits(in_features: int, group_size: int) -> bool:
    """Whether the int4 kernel takes a layer of in_features in groups of group_size: groups of 64, 128 or 256
    (the kernel's activations have one scale per 256), in_features a multiple of 64 and of the group."""
    lib = library()
    return lib is not None and bool(lib.llama_int4_fits(in_features, group_size))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 codes q (N, K) in [0, 15], K a multiple of 64 -> (N, K / 2) uint8 in the kernel's order: in each run
    of 64 codes, byte i holds code i in its low nibble and code 32 + i in its high one."""
    n, k = q.shape
    runs = q.to(torch.uint8).view(n, k // 64, 2, 32)
    return (runs[:, :, 0] | runs[:, :, 1] << 4).view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (N, K / 2) uint8 -> codes (N, K) uint8."""
    n, half = packed.shape
    runs = packed.view(n, half // 32, 1, 32)
    return torch.cat([runs & 15, runs >> 4], dim=2).view(n, 2 * half)


KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama::rms_norm for CPU tensors: ops.rms_norm_reference's result, in one pass over x."""
    k = x.shape[-1]
    if x.dtype not in KERNEL_DTYPES or weight.shape != (k,) or weight.dtype != x.dtype:
        return ops.rms_norm_reference(x, weight, eps)
    x = x.contiguous()
    y = torch.empty_like(x)
    library().llama_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), act_bf16(x), x.numel() // k,
                             k, eps)
    return y


def attention(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rotation: torch.Tensor,
              start: torch.Tensor, rows: Optional[torch.Tensor], n_heads: int, cache_len: int) -> torch.Tensor:
    """llama::attention for CPU tensors: a decode step (one new token per row) in one kernel call, reading each row's
    cache only up to its position; anything else through ops.attention_reference."""
    bsz, seqlen, features = qkv.shape
    n_kv_heads, head_dim = cache_k.shape[1], cache_k.shape[3]
    # the kernel writes into the caches through raw pointers: take only what it was written for
    if not (seqlen == 1 and qkv.dtype in KERNEL_DTYPES and cache_k.dtype == cache_v.dtype == qkv.dtype
            and cache_k.shape == cache_v.shape and cache_k.is_contiguous() and cache_v.is_contiguous()
            and features == (n_heads + 2 * n_kv_heads) * head_dim and n_heads % n_kv_heads == 0
            and rotation.shape == (bsz, 1, head_dim // 2, 2) and rotation.dtype == torch.float32
            and start.shape == (bsz,) and start.dtype == torch.int64
            and (rows is None or (rows.shape == (bsz,) and rows.dtype == torch.int64))):
        return ops.attention_reference(qkv, cache_k, cache_v, rotation, start, rows, n_heads, cache_len)
    qkv, rotation, start = qkv.contiguous(), rotation.contiguous(), start.contiguous()
    rows = rows.contiguous() if rows is not None else None
    out = qkv.new_empty(bsz, 1, n_heads * head_dim)
    check(library().llama_decode_attention(
        qkv.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), rotation.data_ptr(), start.data_ptr(),
        None if rows is None else rows.data_ptr(), out.data_ptr(), act_bf16(qkv), bsz, n_heads, n_kv_heads, head_dim,
        cache_k.shape[0], cache_k.shape[2]))
    return out


@functools.lru_cache(maxsize=None)  # once: the dispatcher takes one kernel per op and device
def register_kernels() -> bool:
    """Run llama::rms_norm and llama::attention on CPU tensors through these kernels from now on, where they build
    (else the ops keep their PyTorch references); whether they did. Called once by Llama.build for a CPU model."""
    if not available():
        return False
    LIBRARY.impl("rms_norm", rms_norm, "CPU")
    LIBRARY.impl("attention", attention, "CPU")
    return True


HUGE_PAGE = 2 << 20


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """t (on the CPU) copied into 2 MiB-aligned memory that Linux backs with transparent huge pages (madvise), where
    it offers them: one TLB entry per 2 MiB instead of per 4 KiB of a streamed weight. Elsewhere, and for tensors
    smaller than a huge page, t itself."""
    if t.nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    region = mmap.mmap(-1, t.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive as long as the tensor
    start = -memory.data_ptr() % HUGE_PAGE  # the first huge-page boundary
    try:  # whole huge pages only, and before they are touched: the copy then faults them in as huge pages
        region.madvise(mmap.MADV_HUGEPAGE, start, t.nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel without transparent huge pages
        return t
    return memory[start : start + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
