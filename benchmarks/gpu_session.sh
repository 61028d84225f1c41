#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one device call
# (starting the machine costs minutes of a 30-minute budget).
#
# Here, before the call (fla-core is not on the GPU machine, which has no network):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl fla-core
#   (fla-core is pure Python; plain `pip download --no-deps -d .whl fla-core` also works.)
# The call: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# It writes every log and JSON under $OUT (at most 8 files come back).
#
# Budget: the run's 600 s limit. The steps' timeouts below sum to 580 s (the
# first step's device setup takes the rest); change one, keep the sum.
set -uo pipefail
OUT="${OUT:-results/gpu_session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

# 1. Compile and run the kernels for real: every gpu-marked test (kernels
#    against the float32 recurrence, compiled), and the lowering tests.
timeout 200 python3 -m pytest -q -m "gpu" tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 40 python3 -m pytest -q tests/pallas_kernels/test_lowering.py -p no:cacheprovider 2>&1 \
  | tail -3 | tee -a "$OUT/pytest_gpu.log"

# 2. Time the chunked kernels against XLA, cuDNN attention and fla; then the scans.
timeout 130 python3 benchmarks/chunked_linear_attention.py --out "$OUT/chunked_linear_attention.json" \
  2>&1 | tee "$OUT/chunked_linear_attention.log"
timeout 100 python3 benchmarks/scan.py --output "$OUT/scan.json" 2>&1 | tee "$OUT/scan.log"

# 3. Softmax attention: our kernel vs cuDNN vs the XLA forms (forward, forward+backward,
#    causal, with and without segments). It saves JSON after every row and starts no
#    row after --budget-s, so the timeout only guards a hang.
timeout 110 python3 benchmarks/attention.py --seq-lens 2048 8192 32768 --budget-s 80 \
  --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
