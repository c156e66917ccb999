#!/usr/bin/env bash
# Issue #16's GPU measurements in a few calls of the lent device machine (the `device` tool's `run`).
#
# The device machine reaches nothing outside itself and gets only the working tree, so what it lacks is carried:
#
#   here:    bash benchmarks/gpu_session.sh prepare
#            -> .gpu/ (git-ignored, never committed): wheels of the pure-Python dependencies its image lacks
#               (umap-learn, pynndescent, plotly), bert-base-uncased's tokenizer files (from the embedded
#               model's package, no weights) and a copy of the shared corpus (the ../shared beside the checkout
#               does not travel). About 11 MB.
#   device:  run(command="bash benchmarks/gpu_session.sh run tests", carry=[".gpu"])
#            run(command="bash benchmarks/gpu_session.sh run bench", carry=[".gpu"])       (about 5 min)
#            run(command="bash benchmarks/gpu_session.sh run reproduce", carry=[".gpu"])   (full and --quick)
#
# Each step writes its JSON and logs under $OUT (they come back) and ends with a short summary. The image's own
# torch and transformers are used (the script prints their versions); the CUDA tests run first, so an
# incompatibility shows there. ATTNLAB_BENCH_DEVICE=cpu, ATTNLAB_BENCH_N=2 and ATTNLAB_REPRODUCE_MODES=quick
# smoke-test the steps without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$(pwd)
CARRY="$HERE/.gpu"
OUT="${OUT:-/tmp/attnlab-gpu-out}"
DEVICE="${ATTNLAB_BENCH_DEVICE:-cuda}"
PY="${PYTHON:-python3}"

prepare() {
  mkdir -p "$CARRY/wheels" "$CARRY/tokenizer" "$CARRY/corpus"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" \
    "umap-learn==$("$PY" -m pip show umap-learn | awk '/^Version/{print $2}')" \
    "pynndescent==$("$PY" -m pip show pynndescent | awk '/^Version/{print $2}')" \
    "plotly==$("$PY" -m pip show plotly | awk '/^Version/{print $2}')"
  model=$("$PY" -c "from attnlab.core.models import embedded_model_path; print(embedded_model_path())")
  for f in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
    [ -f "$model/$f" ] && cp "$model/$f" "$CARRY/tokenizer/"
  done
  corpus="$HERE/../shared/data/simplewiki/articles-400.jsonl.gz"
  if [ -f "$corpus" ]; then cp "$corpus" "$CARRY/corpus/"; else echo "note: no shared corpus beside the checkout"; fi
  du -sh "$CARRY"
}

setup_device() {
  mkdir -p "$OUT"
  if ! "$PY" -c "import umap, plotly" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl
  fi
  if ! "$PY" -c "import attnlab" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  fi
  "$PY" - <<'EOF' | tee "$OUT/versions.txt"
import torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
EOF
}

run_tests() {
  # the CUDA and bf16 equivalence tests, the roofline arithmetic, every family's extractor against HF eager
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_extractor.py tests/test_benchmarks.py \
    tests/test_architectures.py 2>&1 | tee "$OUT/tests.log" | tail -15
}

run_bench() {
  local n="${ATTNLAB_BENCH_N:-256}"
  for dtype in float32 tf32 bfloat16; do
    [ "$DEVICE" = cpu ] && [ "$dtype" = tf32 ] && continue
    extra=()
    [ "$dtype" = bfloat16 ] && extra=(--profile)
    "$PY" benchmarks/bench_extractor.py --device "$DEVICE" --dtype "$dtype" --n "$n" --batch-size "$n" \
      --memory-n "$([ "$DEVICE" = cpu ] && echo 4 || echo 200)" --json "$OUT/extractor-$dtype.json" \
      "${extra[@]}" > "$OUT/extractor-$dtype.log" 2>&1
    grep -E "^\((a|b|c|d)\)" "$OUT/extractor-$dtype.log" | sed "s/^/$dtype /"
  done
}

run_reproduce() {
  local corpus="$CARRY/corpus/articles-400.jsonl.gz"
  for mode in ${ATTNLAB_REPRODUCE_MODES:-quick full}; do
    flag=()
    [ "$mode" = quick ] && flag=(--quick)
    "$PY" benchmarks/bench_reproduce.py --out "/tmp/attnlab-reproduce-$mode" --device "$DEVICE" \
      --models-dir /tmp/attnlab-random-models --tokenizer "$CARRY/tokenizer" --corpus "$corpus" "${flag[@]}" \
      > "$OUT/reproduce-$mode.log" 2>&1 || true
    grep -E "^(reproduce|  )" "$OUT/reproduce-$mode.log" | head -30
  done
}

case "${1:-}" in
  prepare) prepare ;;
  run)
    setup_device
    case "${2:-}" in
      tests) run_tests ;;
      bench) run_bench ;;
      reproduce) run_reproduce ;;
      *) echo "usage: gpu_session.sh run tests|bench|reproduce" >&2; exit 2 ;;
    esac ;;
  *) echo "usage: gpu_session.sh prepare | run tests|bench|reproduce" >&2; exit 2 ;;
esac
