#!/usr/bin/env bash
# Measure a GPU host the way docs/benchmarks.md's GPU section does, in up to three
# 'edge-ptychonn bench' runs (minutes each; each run's report.json, tables and logs land in
# OUT/<part>). The commands are those of that section's tables, gathered in one place; this
# script itself has not run on a GPU yet (--dry-run prints them). The parts:
#   engine    the GPU's peaks, the warm start (launch -> first output), and the torch engine alone
#             in fp32, tf32, bf16 and fp16 at batch 1, 8, 32 and 64, with and without CUDA graphs
#             (and the TensorRT engine at batch 8 in fp32 and fp16 when tensorrt and pycuda
#             import: its plans are built first, with 'edge-ptychonn build-engine')
#   pipeline  the live chain from the fast source: the highest lossless rate of 1, 2, 4 and 8
#             consumers on the GPU (torch fp16, or TensorRT fp16 when it imports), climbing from
#             2500 frames/s per consumer
#   frame     zero-cost, floor and PvaPy passthrough consumers (1 and 2) from the fast source: what
#             the frame path costs against PvaPy's own, and how close to it any Python processor of
#             model outputs comes (the floor: PvaPy's calls alone)
# Usage: bash scripts/gpu-bench.sh [--parts engine,pipeline,frame] [--consumers 1,2,4,8]
#                                  [--out results/gpu-bench] [--dry-run]
# --dry-run prints the commands instead of running them. It needs a GPU that torch sees (the
# CUDA build of torch in the environment) and PvaPy; it keeps all pvAccess traffic on loopback,
# as the bench does.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

parts=engine,pipeline,frame
consumers=1,2,4,8
out=results/gpu-bench
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --parts) parts=${2:?--parts needs a value}; shift 2 ;;
        --consumers) consumers=${2:?--consumers needs a value}; shift 2 ;;
        --out) out=${2:?--out needs a value}; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu-bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for part in ${parts//,/ }; do
    case "$part" in
        engine|pipeline|frame) ;;
        *) echo "gpu-bench.sh: unknown part '$part' in --parts: engine, pipeline, frame" >&2; exit 2 ;;
    esac
done
if ! [[ "$consumers" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]]; then
    echo "gpu-bench.sh: --consumers must be counts such as 1,2,4,8, got '$consumers'" >&2
    exit 2
fi

tool=$(command -v edge-ptychonn || true)
[ -x "$root/.venv/bin/edge-ptychonn" ] && tool="$root/.venv/bin/edge-ptychonn"
python=$(command -v python3 || true)
[ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
if [ -z "$tool" ] && [ "$dry" = 0 ]; then
    echo "gpu-bench.sh: edge-ptychonn not found; run: bash scripts/setup-venv.sh torch,bench" >&2
    exit 2
fi

tensorrt=0
if [ -n "$python" ] && "$python" -c "import tensorrt, pycuda" >/dev/null 2>&1; then
    tensorrt=1
fi
pipeline_engine=torch
[ "$tensorrt" = 1 ] && pipeline_engine=tensorrt
# the options every run shares: the GPU, one engine per consumer, the consumers as a user's processes
common=(--device auto --threads 1 --workers 1 --no-realtime --no-plots)

run() {  # run PART ARGS...: one bench run into OUT/PART
    local part=$1
    shift
    echo "== $part: ${tool:-edge-ptychonn} bench --out $out/$part $*"
    if [ "$dry" = 0 ]; then
        "$tool" bench --out "$out/$part" "$@"
    fi
}

case ",$parts," in *,engine,*)
    if [ "$tensorrt" = 1 ]; then
        echo "== engine: ${tool:-edge-ptychonn} build-engine --batch 8 --precision fp32,fp16"
        [ "$dry" = 1 ] || "$tool" build-engine --batch 8 --precision fp32,fp16
    fi
    run engine --skip framepath,pipeline,zero,floor,passthrough "${common[@]}" --engines torch \
        --precisions fp32,tf32,bf16,fp16 --batches 1,8,32,64 --cuda-graphs both \
        --engine-seconds 0.4 --engine-repeats 2
    if [ "$tensorrt" = 1 ]; then  # its warm start from the plans just built, and the engine alone
        run engine-tensorrt --skip framepath,pipeline,zero,floor,passthrough "${common[@]}" --engines tensorrt \
            --precisions fp32,fp16 --batches 8 --engine-seconds 0.4 --engine-repeats 2
    fi
    ;;
esac
case ",$parts," in *,pipeline,*)
    run pipeline --skip warm,engine,framepath,zero,floor,passthrough "${common[@]}" \
        --pipeline-engine "$pipeline_engine" --pipeline-precision fp16 --source fast --collectors 4 \
        --consumers "$consumers" --pipeline-climb --ceiling-per-consumer --ceiling-start 2500 \
        --ceiling-factor 1.35 --refine 0 --down 2 --duration 1.5 --max-frames 24000
    ;;
esac
case ",$parts," in *,frame,*)
    run frame --skip warm,engine,framepath,pipeline "${common[@]}" --source fast --consumers 1,2 \
        --ceiling-start 4000 --ceiling-factor 1.35 --refine 0 --down 2 --duration 1.5 --max-frames 24000
    ;;
esac
echo "reports: $out/<part>/report.json (docs/benchmarks.md explains each figure)"
