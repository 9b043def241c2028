#!/usr/bin/env bash
# Issue 19 (+ the Shapes rows of issue 21) on one GPU: bench/family_reward_step.py for Wan2.1-1.3B (17-81 frames) and
# SD3.5-medium, then bench/sampling_speed.py on the Shapes teachers with CUDA graphs. Each run has its own time
# limit and writes its JSON as it goes. Usage (device): bash THIS OUT
set -u
OUT=${1:?out dir}
mkdir -p "$OUT"
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
run() { local limit=$1 name=$2 script=$3; shift 3; echo "== $name"; timeout "$limit" python3 "$script" "$@" \
  > "$OUT/$name.log" 2>&1; echo "rc=$? $name"; tail -4 "$OUT/$name.log"; }
run 290 wan bench/family_reward_step.py --family wan --out "$OUT/frs"
run 130 sd3 bench/family_reward_step.py --family sd3 --out "$OUT/frs"
run 60 shapes_image_cg bench/sampling_speed.py --teacher shapes-image --text_length 32 --compile reduce-overhead \
  --batches 1 16 --repeats 5 --warmup 3 --out "$OUT/shapes_image_cg"
run 70 shapes_video_cg bench/sampling_speed.py --teacher shapes-video --text_length 32 --compile reduce-overhead \
  --batches 1 4 --repeats 5 --warmup 3 --out "$OUT/shapes_video_cg"
