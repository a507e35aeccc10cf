#!/usr/bin/env bash
# The benchmark rows on a GPU, in one command (< 5 minutes):
#
#     bash benchmarks/gpu.sh            # from the repository root of a copy of this repo
#     bash benchmarks/gpu.sh --full     # + a Camelyon-size slide end to end (< 10 minutes)
#
# Prints the onnxruntime version and providers and the card (nvidia-smi), then runs
# `python -m benchmarks.run --quick` with the CUDA provider at fp32 and fp16 (IO binding: tiles
# copied to the device once per batch, features stay there between backbone and head), the naive
# baseline in torch on CUDA (CLAM's DataLoader with 8 workers). JSON goes to $OUT/gpu.json when
# $OUT is set (the device runner collects it), else benchmarks/results/gpu.json.
#
# Needs the project's environment: .venv carried over (or $PYTHON pointing at an interpreter with
# the project installed: pip install -e . from wheels). CUDA/cuDNN come from the nvidia-* pip
# wheels that torch installs; their lib folders are put on LD_LIBRARY_PATH so that onnxruntime's
# CUDA provider finds them in the server process too.
#
# --full (instead of the rows above; the rest of the arguments go to it): benchmarks/
# bench_gpu_full.py scores a Camelyon-size synthetic slide (98304 x 196608 px, 512-px JPEG tiles
# with shared JPEGTables, ~113k tissue tiles, written in ~30 s) end to end through the real
# pipeline, alone and as 4 concurrent slides, with the CUDA provider and the TensorRT provider
# (fp16, engine cache on disk in $MILROI_TRT_CACHE) where it loads, plus the CPU decode-once and
# nvImageCodec GPU tile readers alone; JSON to $OUT/gpu_full.json. It refuses (exit 3) to report
# end-to-end figures measured on fewer than 10^4 tiles. `--full --dry-run` runs it on a small
# slide with the CPU provider (no GPU needed: it checks the script, and is refused).
#
# The GPU tile decode needs the [gpu] extra (nvImageCodec + nvJPEG, cuda-bindings). A GPU machine
# that reaches no package index gets it from wheels carried in .gpu-wheels/ (git-ignored, 36 MB),
# made beforehand on a machine with the index (the GPU machine's Python: 3.12 here):
#   python -m pip download --only-binary=:all: --python-version 3.12 -d .gpu-wheels \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       'nvidia-nvimgcodec-cu13[nvjpeg]>=0.9,<0.10' 'nvidia-nvjpeg>=13,<14' 'cuda-bindings>=13,<14'
# Without it the benchmarks run, and say that the CPU reader decoded the tiles.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=quick
if [ "${1:-}" = "--full" ]; then
    MODE=full
    shift
elif [ $# -gt 0 ]; then
    echo "usage: bash benchmarks/gpu.sh [--full [bench_gpu_full options]]" >&2
    exit 2
fi

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
# The cached slide lives outside the tree; a fresh machine writes it once (~40 s).
export MILROI_BENCH_CACHE=${MILROI_BENCH_CACHE:-$HOME/.cache/milroi/bench}

WHEELS=${MILROI_GPU_WHEELS:-.gpu-wheels}
if [ -d "$WHEELS" ]; then
    echo "== installing the GPU tile decode from $WHEELS"
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" \
        'nvidia-nvimgcodec-cu13[nvjpeg]>=0.9,<0.10' 'nvidia-nvjpeg>=13,<14' 'cuda-bindings>=13,<14' \
        || echo "could not install them: the tiles are decoded on the CPU"
fi

site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$site/nvidia" ]; then
    libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
fi

echo "== card"
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv \
    || echo "nvidia-smi failed (no GPU visible?)"
echo "== onnxruntime"
timeout 120 "$PYTHON" - <<'EOF'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "device", ort.get_device())
print("available providers:", ort.get_available_providers())
# A real session tells whether CUDA initialises (onnxruntime-gpu lists it even when it cannot).
from serving.sessions import CUDA
import numpy as np, onnx, onnx.helper as h
graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "probe",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)
session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, "CPUExecutionProvider"])
print("probe session providers:", session.get_providers())
EOF

if [ "$MODE" = full ]; then
    echo "== Camelyon-size slide end to end (bench_gpu_full)"
    export MILROI_TRT_CACHE=${MILROI_TRT_CACHE:-$MILROI_BENCH_CACHE/trt}
    # The whole --full run stays under 10 minutes: the Python side skips stages past its budget.
    status=0
    timeout 560 "$PYTHON" -m benchmarks.bench_gpu_full --out "$OUT_DIR" --budget-s 480 "$@" || status=$?
    echo "== bench_gpu_full exit status $status (3: refused, fewer than 10^4 tiles)"
    exit $status
fi

echo "== benchmarks (CUDA, fp32 + fp16)"
timeout 270 "$PYTHON" -m benchmarks.run --quick --provider cuda --precisions fp32,fp16 \
    --naive-device cuda --out "$OUT_DIR" --json-name gpu.json
echo "== written $OUT_DIR/gpu.json"
