#!/usr/bin/env bash
# The GPU check in one call: numerical tests on the device, ours vs
# stylegan2-ada-pytorch (256x256x5 batch 32, and configs/demo.py), and the
# embedding throughput. docs/benchmarks.md#gpu-check describes it.
#
#   tools/gpu_check.sh prepare REF   # here, once: .whl/ (wheels the GPU image
#                                    # lacks, for its Python) and
#                                    # .ref/stylegan2-ada-pytorch (from REF: a
#                                    # checkout or its git directory)
#   tools/gpu_check.sh run           # on the GPU machine (carry .whl and
#                                    # .ref); everything goes to $OUT
#
# `run` stays under 10 minutes: every step has its own time limit (seconds,
# below) and a step that fails or times out does not stop the next.
set -u
cd "$(dirname "$0")/.."

# The GPU image (Python 3.12, jax 0.11 with CUDA, torch, flax, optax,
# orbax-checkpoint, pandas, pyarrow, scipy, scikit-learn, matplotlib, pytest)
# lacks only these of what the tests and benches import.
PY_VERSION=${PY_VERSION:-3.12}
WHEELS=${WHEELS:-"ml-collections==1.1.0"}
T_TESTS=${T_TESTS:-150}
T_TRAIN256=${T_TRAIN256:-210}
T_DEMO=${T_DEMO:-90}
T_EMBED=${T_EMBED:-90}

prepare() {
  local ref=${1:?usage: tools/gpu_check.sh prepare REF (stylegan2-ada-pytorch checkout or git dir)}
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
  grep -qx "/.ref/" "$exclude" 2>/dev/null || echo "/.ref/" >> "$exclude"
  mkdir -p .whl .ref/stylegan2-ada-pytorch
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $WHEELS || return 1
  if [ -d "$ref/training" ]; then
    (cd "$ref" && tar -c --exclude=.git .) | tar -x -C .ref/stylegan2-ada-pytorch
  else
    git --git-dir="$ref" archive HEAD | tar -x -C .ref/stylegan2-ada-pytorch
  fi || return 1
  test -d .ref/stylegan2-ada-pytorch/training || {
    echo "prepare: $ref is not a stylegan2-ada-pytorch checkout (no training/)"
    return 1; }
  du -sh .whl .ref
  echo "carry: [\".whl\", \".ref\"]; command: tools/gpu_check.sh run"
}

step() {   # step NAME SECONDS COMMAND...: output to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
}

run() {
  : "${OUT:?run writes to \$OUT}"
  export PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions   # op builds reused
  local ref=.ref/stylegan2-ada-pytorch
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, jax, jaxlib, flax, optax, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
    git rev-parse HEAD 2>/dev/null
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  # 1. The numerical tests (parity with the reference's fixtures, layers,
  #    resampling, networks) on the GPU, float32 at full precision.
  step tests "$T_TESTS" env GANDL_TEST_PLATFORM=cuda python3 -m pytest \
    -p no:xdist -p no:cacheprovider -q tests/model/test_parity.py \
    tests/model/test_layers.py tests/model/test_resample.py tests/model/test_networks.py
  # 2. Ours vs the reference, 256x256x5 (the paper config), batch 32.
  step train256 "$T_TRAIN256" python3 -m tools.bench.train \
    --config configs/gandl_rxrx19a.py:256 --config.batch_size=32 \
    --iterations 16 --rounds 2 --warmup 1 --reference "$ref" \
    --reference_timeout 150 --jsonl "$OUT/bench.jsonl"
  # 3. The same at configs/demo.py (32x32, float32).
  step demo "$T_DEMO" python3 -m tools.bench.train --config configs/demo.py \
    --iterations 32 --rounds 2 --warmup 1 --reference "$ref" \
    --reference_timeout 60 --jsonl "$OUT/bench.jsonl"
  # 4. Embedding throughput (gandl-export's D forward), 256x256x5.
  step embed "$T_EMBED" python3 -m tools.bench.embed \
    --config configs/gandl_rxrx19a.py:256 --batch 64 --batches 16 \
    --rounds 2 --reference "$ref" --reference_timeout 60 \
    --jsonl "$OUT/bench.jsonl"
  echo "== figures (metric value unit; reference: device, custom ops)"
  python3 - "$OUT/bench.jsonl" <<'EOF' | tee "$OUT/figures.txt"
import json, sys
try:
  lines = open(sys.argv[1]).read().splitlines()
except OSError:
  sys.exit("no bench records")
for line in lines:
  r = json.loads(line)
  if r["metric"] in ("img_per_sec", "reference_img_per_sec",
                     "speedup_vs_reference", "compile_sec"):
    ref = r["config"].get("reference") or {}
    print(f"{r['bench']:6s} {r['config'].get('resolution')}px batch "
          f"{r['config'].get('batch')} {r['config'].get('compute_dtype')}: "
          f"{r['metric']} {r['value']:.3g} {r['unit']}" +
          (f" (reference {ref.get('device_name')}, ops "
           f"{ref.get('custom_ops')}, tf32 {ref.get('allow_tf32')})"
           if ref else ""))
EOF
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
