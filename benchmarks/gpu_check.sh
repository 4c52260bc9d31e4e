#!/usr/bin/env bash
# The CUDA path, proven in one command on a fresh GPU machine (under 8 minutes on one H200):
#
#   benchmarks/gpu_check.sh OUT_DIR
#   LLAMA_CHECK_DEVICE=cpu LLAMA_CHECK_SHAPE=tiny LLAMA_CHECK_DTYPE=fp32 benchmarks/gpu_check.sh OUT_DIR
#       (its plumbing, on a CPU, as tests/test_examples.py runs it; LLAMA_CHECK_BENCH_FLAGS adds benchmark flags,
#       LLAMA_CHECK_TESTS replaces the test files)
#
# writes under OUT_DIR: env.txt (torch, CUDA, the GPU), tests.log (every test that builds or runs a model, on the
# device: LLAMA_TEST_DEVICE; those that only apply to the CPU say so among the skips), bench.log and
# bench.json (the shape, bf16 by default, eager and compiled, int8 and int4: prefill, decode at batch 1 and 8, each against
# the read bandwidth measured in the same run; peak device memory; host-device synchronisations in 64 decode steps).
# Each part runs even if one before it fails; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
device=${LLAMA_CHECK_DEVICE:-cuda}
shape=${LLAMA_CHECK_SHAPE:-7b}
dtype=${LLAMA_CHECK_DTYPE:-bf16}
export PYTHONUNBUFFERED=1  # a part stopped at its time limit still leaves its log
mkdir -p "$out"
status=0

python3 - > "$out/env.txt" 2>&1 <<'PY' || status=$?
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY

tests=${LLAMA_CHECK_TESTS:-tests/test_model.py tests/test_generation.py tests/test_quantize.py tests/test_streaming.py \
tests/test_chat.py tests/test_llama3.py}
# no -x: one run on a lent GPU should show every failure; -rs lists why each skipped test does not apply there
# shellcheck disable=SC2086
LLAMA_TEST_DEVICE=$device timeout 240 python3 -m pytest -q -rs -p no:cacheprovider $tests \
    > "$out/tests.log" 2>&1 || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
tail -n 1 "$out/tests.log"

timeout 420 python3 benchmarks/bench_generate.py --shape "$shape" --device "$device" --engines ours --dtype "$dtype" \
    --variants '{"ours compiled": {"compile": true}, "ours int8": {"quantize": "int8"}, "ours int4": {"quantize": "int4"}}' \
    --work_dir "${TMPDIR:-/tmp}/llama-gpu-check" --json_path "$out/bench.json" ${LLAMA_CHECK_BENCH_FLAGS:-} \
    > "$out/bench.log" 2>&1 ||
    { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
tail -n 12 "$out/bench.log"
exit "$status"
