#!/usr/bin/env bash
# Issue 21 on one GPU: bench/sampling_speed.py at SD-1.5 size (eager vs channels_last + bf16 decode, then + CUDA
# graphs via torch.compile reduce-overhead) and on the shipped Shapes teachers. Each run has its own time limit and
# writes its JSON after every batch size, so a run cut short keeps what it measured. Usage (device): bash THIS OUT
set -u
OUT=${1:?out dir}
mkdir -p "$OUT"
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
run() { local limit=$1 name=$2; shift 2; echo "== $name"; timeout "$limit" python3 bench/sampling_speed.py \
  --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? $name"; tail -3 "$OUT/$name.log"; }
run 170 sd15_nocompile --compile none --repeats 3 --warmup 1
run 40 shapes_image --teacher shapes-image --text_length 32 --compile none --batches 1 16 64 --repeats 5 --warmup 2
run 50 shapes_video --teacher shapes-video --text_length 32 --compile none --batches 1 4 16 --repeats 5 --warmup 2
run 250 sd15_cudagraphs --compile reduce-overhead --compile_vae default --repeats 3 --warmup 2
