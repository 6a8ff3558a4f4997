#!/usr/bin/env bash
# The GPU rows of issue 17 in one prepared, time-boxed script, for a session lent a GPU through the
# device tool (15 device-minutes in all, start-up included; torch 2.11 + CUDA there, no network,
# every flm dependency but optree preinstalled).
#
#   bash bench/gpu_session.sh prepare   # here: optree's wheel into .whl/, the TinyStories excerpt
#                                       # into .gpu-data/ (both git-ignored through .git/info/exclude)
#   then, through the device tool:  command "bash bench/gpu_session.sh run", carry [".whl", ".gpu-data"],
#   timeout_s 600; the files come back from $OUT (at most 8 files, 2 folders down).
#
# `run` does, each step under its own timeout so one slow step cannot eat the others:
#   1. the CUDA tests (logits against the CPU, bf16 step, pinned batches)        ≤ 2 min
#   2. bench/run_all.py --device cuda (train_step: handout 128×256 and GPT-2-small
#      16×1,024 against a compiled HF Llama, MFU; the other accelerator benches)  ≤ 5 min
#   3. flm train on the handout preset, 60 steps each: the default (auto: bf16 +
#      compile on CUDA), float32 eager, and the default with --compile-mode
#      reduce-overhead (CUDA graphs), tokens/s and the compile time               ≤ 7.5 min
# Checked on a CPU as `FLM_GPU_DEVICE=cpu FLM_GPU_QUICK=1 bash bench/gpu_session.sh run`
# (tiny preset, --quick benches), which tests/test_bench.py runs.
set -uo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

prepare() {
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  grep -qxF '/.gpu-data/' .git/info/exclude 2>/dev/null || echo '/.gpu-data/' >>.git/info/exclude
  local version
  version=$(python3 -c "import importlib.metadata as m; print(m.version('optree'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "optree==$version"
  local data=${FLM_SHARED_DATA:-../shared/data}/tinystories
  mkdir -p .gpu-data
  cp "$data"/train.txt "$data"/valid.txt .gpu-data/
  ls -la .whl .gpu-data
}

run() {
  local out=${OUT:-$(mktemp -d)} device=${FLM_GPU_DEVICE:-cuda} quick=() preset=handout steps=60
  if [ -n "${FLM_GPU_QUICK:-}" ]; then quick=(--quick); preset=tiny; steps=4; fi
  if ! python3 -c "import optree" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then  # the device lacks optree
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flm-site .whl/*.whl \
      || { echo "error: could not install the carried wheels"; return 1; }
    export PYTHONPATH="/tmp/flm-site:$here${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
  python3 -c "import torch, optree; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', '| date', __import__('datetime').date.today())" \
    | tee "$out/env.txt"

  echo "== 1. CUDA tests"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -k "cuda or CUDA" tests/test_model.py tests/test_data.py \
    tests/test_train_step.py tests/test_mixed_precision.py 2>&1 | tail -5 | tee "$out/tests.txt"

  echo "== 2. benches (bench/run_all.py --device $device)"
  timeout 330 python3 bench/run_all.py --device "$device" "${quick[@]}" --out-dir "$out/bench" 2>&1 | tail -40 >"$out/bench.txt"
  tail -20 "$out/bench.txt"

  echo "== 3. flm train --preset $preset, $steps steps: the default (auto), float32 eager, CUDA graphs"
  local text=.gpu-data
  [ -f "$text/train.txt" ] || text=${FLM_SHARED_DATA:-../shared/data}/tinystories
  local common=(train --preset "$preset" --device "$device" --train-text "$text/train.txt" --valid-text "$text/valid.txt"
    --max-iters "$steps" --eval-interval "$steps" --checkpoint-interval "$steps" --log-interval "$((steps / 2 > 0 ? steps / 2 : 1))"
    --max-new-tokens 8)
  local variant
  local variants=(auto float32-eager)
  [ "$device" = cuda ] && variants+=(reduce-overhead)  # CUDA graphs exist on CUDA only (refused elsewhere)
  for variant in "${variants[@]}"; do
    local flags=()
    [ "$variant" = float32-eager ] && flags=(--dtype float32 --no-compile)
    [ "$variant" = reduce-overhead ] && flags=(--compile-mode reduce-overhead)
    rm -rf "/tmp/flm-gpu-$variant"
    timeout 150 python3 -m flm "${common[@]}" "${flags[@]}" --out-dir "/tmp/flm-gpu-$variant" >"$out/train-$variant.txt" 2>&1
    echo "-- $variant: exit $?"
    grep -E "^plan|auto:|compil|tok/s|tokens/s|val" "$out/train-$variant.txt" | tail -8
  done
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
