"""Our CPU decoding against llama.cpp built for the same ISA, in the same run (issue 17).

    python benchmarks/bench_llamacpp.py --shapes 134m,1.1b --isa avx2 [--threads 2] [--repeats 2] [--norepack]
                                        [--json_path out.json]
    python benchmarks/bench_llamacpp.py build --isa native       # only build llama.cpp

For each named random shape of bench_generate.py: ours bf16 against llama.cpp's bf16 GGUF, and ours int8 against
llama.cpp's q8_0, as tokens/s of a 512-token prefill, decoding at batch 1, and aggregate decoding over 8 parallel
sequences. Ours runs through bench_generate.py's engine subprocess (its figures exactly: best of two after a
warm-up; decoding 32 tokens after a 16-token prompt). llama.cpp runs `llama-bench -p 512 -n 32 -r 2` (a warm-up,
then the best of its two samples) and `llama-batched-bench -npp 16 -ntg 32 -npl 8,8,8` (the best of the last two).
--repeats N runs every engine N times, alternating them to damp a shared machine's drift, and keeps each figure's best.

llama.cpp is built from the llama-cpp-python sdist (downloaded with pip into ~/.cache/llama if no --sdist is given)
into ~/.cache/llama/llama.cpp-<commit>-<isa>, once. --isa avx2 builds it with GGML_NATIVE=OFF and AVX, AVX2, FMA,
F16C, BMI2 and SSE4.2 only (every AVX-512, AVX-VNNI and AMX option off), and runs ours with LLAMA_KERNEL_FLAGS=
"-O3 -march=haswell -mtune=haswell -fopenmp" and PyTorch held to AVX2 for the long prompts ours hands to its GEMM
(ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2); llama.cpp's build is checked to
hold no AVX-512 instruction (no zmm register in `objdump -d` of its libraries and programs; 0 for llama.cpp 0c1e570
from llama-cpp-python 0.3.36). --isa native builds both with -march=native. GGUFs are made from our checkpoint with
`python -m llama.convert to_hf`, llama.cpp's convert_hf_to_gguf.py (--outtype bf16) and llama-quantize (q8_0), and
cached in --work_dir.

--norepack runs llama.cpp with `--repack 0` (llama-bench) and `--no-repack` (llama-batched-bench): on x86 that turns
off only its AMX buffers (it repacks q8_0 and bf16 for nothing else there), whose int8 kernels fault on CPUs that
report AMX but where its tile setup fails (SIGILL at `tileloadd` on the 2-core Sapphire Rapids VM of
docs/performance.md, where oneDNN's AMX runs): llama.cpp then runs its AVX-512 VNNI and AVX512-BF16 code.
"""

import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Optional

import fire

from bench_generate import named_checkpoint

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp we build
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "llama")
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
ISA_FLAGS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
             "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
             "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
             "-DGGML_AMX_BF16=OFF"],
}
KERNEL_FLAGS = {"native": None, "avx2": "-O3 -march=haswell -mtune=haswell -fopenmp"}  # LLAMA_KERNEL_FLAGS of ours
# and PyTorch's own limits (its kernels, oneDNN's, MKL's), for the prompts that ours hands to PyTorch's GEMM
TORCH_ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
METRICS = ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")


def sh(cmd, **kwargs) -> str:
    """Run cmd (printed first), failing loudly with its output; return its stdout."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def llama_cpp_source(sdist: Optional[str]) -> str:
    """The vendored llama.cpp of an unpacked llama-cpp-python sdist, downloaded and unpacked into CACHE if not given."""
    if sdist is None:
        sdist = os.path.join(CACHE, f"llama_cpp_python-{LLAMA_CPP_PYTHON}")
        if not os.path.isdir(sdist):
            print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist into {CACHE}", flush=True)
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", CACHE,
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
            with tarfile.open(f"{sdist}.tar.gz") as tar:
                tar.extractall(CACHE, filter="tar")
    return os.path.join(sdist, "vendor", "llama.cpp")


def build(isa: str = "native", sdist: Optional[str] = None) -> str:
    """Build llama-bench, llama-batched-bench and llama-quantize for isa (once); return the folder holding them."""
    src = llama_cpp_source(sdist)
    commit = sh(["git", "-C", src, "rev-parse", "--short", "HEAD"]).strip()
    build_dir = os.path.join(CACHE, f"llama.cpp-{commit}-{isa}")
    bin_dir = os.path.join(build_dir, "bin")
    if all(os.path.exists(os.path.join(bin_dir, t)) for t in TARGETS):
        print(f"llama.cpp {commit} for {isa}: reusing {bin_dir}", flush=True)
        return bin_dir
    print(f"building llama.cpp {commit} for {isa} into {build_dir}", flush=True)
    start = time.perf_counter()
    sh(["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_OPENMP=ON", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *ISA_FLAGS[isa]])
    sh(["cmake", "--build", build_dir, "--config", "Release", "-j", str(os.cpu_count()), "--target", *TARGETS])
    code = [p for p in glob.glob(os.path.join(bin_dir, "*.so*")) if not os.path.islink(p)]
    zmm = sum(line.count("zmm") for path in [*code, *(os.path.join(bin_dir, t) for t in TARGETS)]
              for line in sh(["objdump", "-d", path]).splitlines())
    print(f"built in {time.perf_counter() - start:.0f} s; {zmm} zmm (AVX-512) register uses in its code", flush=True)
    if isa == "avx2" and zmm:
        raise RuntimeError(f"the avx2 build in {build_dir} holds AVX-512 code")
    return bin_dir


def gguf_files(shape: str, work_dir: str, bin_dir: str, src: str) -> dict:
    """{"bf16": path, "q8_0": path}: GGUFs of the named random checkpoint, made once in work_dir."""
    ckpt_dir, _ = named_checkpoint(shape, "bf16", work_dir)
    hf_dir = os.path.join(work_dir, f"{shape}-hf")
    paths = {t: os.path.join(work_dir, f"{shape}-{t}.gguf") for t in ("bf16", "q8_0")}
    if not os.path.exists(hf_dir):
        sh([sys.executable, "-m", "llama.convert", "to_hf", ckpt_dir, hf_dir])
    if not os.path.exists(paths["bf16"]):
        sh([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), hf_dir, "--outtype", "bf16",
            "--outfile", paths["bf16"]], env={**os.environ, "PYTHONPATH": os.path.join(src, "gguf-py")})
    if not os.path.exists(paths["q8_0"]):
        sh([os.path.join(bin_dir, "llama-quantize"), paths["bf16"], paths["q8_0"], "q8_0"])
    return paths


def run_llama_cpp(bin_dir: str, gguf: str, threads: int, repack: bool) -> dict:
    """llama.cpp's figures for one GGUF, with the build it reports."""
    runs = json.loads(sh([os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-t", str(threads), "-p", "512",
                          "-n", "32", "-r", "2", "-o", "json", "--repack", str(int(repack))]))
    pp = next(r for r in runs if r["n_prompt"] == 512)
    tg = next(r for r in runs if r["n_gen"] == 32)
    out = sh([os.path.join(bin_dir, "llama-batched-bench"), "-m", gguf, "-t", str(threads), "-c", "1024",
              "-npp", "16", "-ntg", "32", "-npl", "8,8,8", "--output-format", "jsonl",
              *([] if repack else ["--no-repack"])])
    batched = [json.loads(line) for line in out.splitlines() if line.startswith('{"n_kv_max"')]
    return {"prefill_tok_s": max(pp["samples_ts"]), "decode_b1_tok_s": max(tg["samples_ts"]),
            "decode_b8_tok_s": max(r["speed_tg"] for r in batched[1:]),
            "build": tg["build_commit"]}


def run_ours(ckpt_dir: str, tokenizer_path: str, isa: str, threads: int, build_kwargs: dict) -> dict:
    """bench_generate.py's engine subprocess for our generator, with our kernels compiled for isa."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_KERNEL_FLAGS"}
    env["OMP_NUM_THREADS"] = str(threads)
    env.update(TORCH_ISA_ENV[isa])
    if KERNEL_FLAGS[isa]:
        env["LLAMA_KERNEL_FLAGS"] = KERNEL_FLAGS[isa]
    out = sh([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_generate.py"),
              "engine", "ours", ckpt_dir, tokenizer_path, "cpu", "bf16", "32", str(threads),
              json.dumps(build_kwargs)], env=env)
    return json.loads(next(l for l in reversed(out.splitlines()) if l.startswith("RESULT "))[len("RESULT "):])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def main(shapes: str = "134m,1.1b", isa: str = "native", threads: int = 2, repeats: int = 1,
         work_dir: str = os.path.join(tempfile.gettempdir(), "llama-bench"), sdist: Optional[str] = None,
         json_path: Optional[str] = None, repack: bool = True):
    """Compare ours with llama.cpp on each of `shapes` (comma-separated names of bench_generate.SHAPES); --norepack
    turns off llama.cpp's repacked weight layouts (its AMX ones on x86: see the module docstring)."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown isa {isa!r}; choose one of {sorted(ISA_FLAGS)}")
    names = shapes.split(",") if isinstance(shapes, str) else list(shapes)  # fire parses "a,b" as a tuple
    bin_dir = build(isa, sdist)
    src = llama_cpp_source(sdist)
    report = {"isa": isa, "cpu": cpu_model(), "threads": threads, "repeats": repeats, "repack": repack, "shapes": {}}
    for shape in names:
        ckpt_dir, tokenizer_path = named_checkpoint(shape, "bf16", work_dir)
        ggufs = gguf_files(shape, work_dir, bin_dir, src)
        rows = {"ours bf16": lambda: run_ours(ckpt_dir, tokenizer_path, isa, threads, {}),
                "llama.cpp bf16": lambda: run_llama_cpp(bin_dir, ggufs["bf16"], threads, repack),
                "ours int8": lambda: run_ours(ckpt_dir, tokenizer_path, isa, threads, {"quantize": "int8"}),
                "llama.cpp q8_0": lambda: run_llama_cpp(bin_dir, ggufs["q8_0"], threads, repack)}
        runs = {label: [] for label in rows}
        for _ in range(repeats):
            for label, run in rows.items():
                runs[label].append(run())
        best = {label: {m: max(r[m] for r in results) for m in METRICS} for label, results in runs.items()}
        ratios = {f"{ours} / {theirs}": {m: best[ours][m] / best[theirs][m] for m in METRICS}
                  for ours, theirs in (("ours bf16", "llama.cpp bf16"), ("ours int8", "llama.cpp q8_0"))}
        report["shapes"][shape] = {"best": best, "ratios": ratios, "runs": runs}

        print(f"\n{shape}: {isa} builds on {report['cpu']}, {threads} threads, best of {repeats} run(s); tokens/s "
              f"(llama.cpp {runs['llama.cpp bf16'][0]['build']})")
        print(f"{'':<24}{'prefill 512':>12}{'decode b1':>11}{'decode b8':>11}")
        for label, figures in best.items():
            print(f"{label:<24}" + "".join(f"{figures[m]:>{w}.1f}" for m, w in zip(METRICS, (12, 11, 11))))
        for label, figures in ratios.items():
            print(f"{label:<24}" + "".join(f"{figures[m]:>{w}.2f}x" for m, w in zip(METRICS, (11, 10, 10))))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    fire.Fire({"build": build} if sys.argv[1:2] == ["build"] else main)
