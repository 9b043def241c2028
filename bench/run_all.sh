#!/usr/bin/env bash
# Every GPU benchmark and Shapes experiment of BENCHMARKS.md in one go, on one GPU, in five concurrent lanes.
#
#   bench/run_all.sh RESULTS_DIR [LANES]      # LANES: any of A1 A2 B C D (default), T P V I S L K
#
# The lanes share the GPU (and the host's cores): A1/A2 hold the real-size cost benchmarks, B/C/D the Shapes-world
# experiments (tiny models that leave most of the GPU idle). Timings are ratios measured inside one process, so
# both sides of every ratio see the same load; absolute times are those of a shared GPU. Each job has its own
# time limit and log (RESULTS_DIR/logs/NAME.log); RESULTS_DIR/status gets one line per finished job (rc, seconds).
# Everything runs from the repository root with PYTHONPATH=. (no install needed besides the dependencies).
# Lanes that fit one 10-minute device call each: T trains the video teacher further (from TEACHER_INIT, default the
# shipped one, for TEACHER_MIN whole minutes, default 10); P trains two video teachers from scratch side by side, with
# and without temporal position embeddings (same budget); V is the video ablation on TEACHER_DIR (default the shipped
# teacher; VIDEO_STEPS generator steps, default 90); I the image ablation (IMAGE_STEPS, default 240; both take
# PROMPTS x PER_PROMPT held-out samples and LRM_BETAS, see ablation()); S image settings chosen on validation
# prompts (SWEEP, see lane_S); L the video and text-video LRMs; K the LRM training cost (100k-record cache).
# C = I + the motion overoptimization study, D = V. An ablation runs one process per row (tiny launch-bound nets
# leave the GPU mostly idle) and merges the rows' tables at the end; on one H200 (2026-12-02) seven concurrent image
# rows took 155-356 s, eight video rows 193-369 s (each lane fits one 10-minute device call).
set -u
R=${1:?usage: bench/run_all.sh RESULTS_DIR [LANES]}
shift
LANES=${*:-A1 A2 B C D}
mkdir -p "$R/logs"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}

job() {  # job NAME SECONDS CMD...
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "$(date -u +%H:%M:%S) start $name" >>"$R/status"
    timeout --signal=INT --kill-after=30 "$limit" "$@" >"$R/logs/$name.log" 2>&1
    rc=$?
    echo "$(date -u +%H:%M:%S) done $name rc=$rc $(($(date +%s) - t0))s" >>"$R/status"
}

ABLATION_ROWS=${ABLATION_ROWS:-"cd_only vsd_only vsd_cd vsd_cd_lrm vsd_cd_2step vsd_cd_1step"}
ablation() {  # ablation NAME SECONDS ARGS...: one process per row (tiny launch-bound nets), then one merged table
    # whose sampling times are measured again in the merge process, alone on the GPU (--retime). LRM_BETAS="b ..."
    # adds VSD+CD+LRM runs at beta_ft = b beside the table's row (NAME_beta_b/, same prompts and noise);
    # ABLATION_ARGS="--set KEY=VALUE ..." goes to every row; ABLATION_ROWS picks the rows.
    local name=$1 limit=$2 row b parts=()
    shift 2
    for row in $ABLATION_ROWS; do
        job "${name}_$row" "$limit" $PY bench/distill_shapes_ablation.py --out "$R/$name/$row" --rows "$row" \
            --timing_repeats 0 "$@" ${ABLATION_ARGS:-} &
        parts+=("$R/$name/$row")
    done
    for b in ${LRM_BETAS:-}; do
        job "${name}_beta_$b" "$limit" $PY bench/distill_shapes_ablation.py --out "$R/${name}_beta_$b" \
            --rows vsd_cd_lrm --timing_repeats 0 --set "beta_ft=$b" "$@" ${ABLATION_ARGS:-} &
    done
    wait
    job "${name}_merge" 120 $PY bench/distill_shapes_ablation.py --out "$R/$name" --merge "${parts[@]}" --retime
}

lane_A1() {
    job reward_adapters 360 $PY bench/reward_adapters_throughput.py --out "$R/reward_adapters.json"
    job data_cache 360 $PY bench/data_cache_throughput.py --out "$R/data_cache.json" --tmp /tmp/bench_cache
    job lrm_cost 540 $PY bench/latent_rewards_cost.py --out "$R/lrm_cost.json"
}
lane_A2() {
    job distill_step_cost 240 $PY bench/distill_step_cost.py --out "$R/distill_step_cost"
    job finetune_memory 480 $PY bench/finetune_memory.py --out "$R/finetune_memory"
    job finetune_compare 660 $PY bench/finetune_compare.py --out "$R/finetune_compare"
}
lane_B() {
    job lrm_shapes 780 $PY bench/latent_rewards_shapes.py --out "$R/lrm_shapes" --workers 6
    job overopt_jpeg 540 $PY -m lrm.cli overopt --config configs/overopt_shapes_jpeg.yaml \
        --run_dir "$R/overopt_jpeg" --progress false
}
lane_C() {
    lane_I
    job overopt_motion 720 $PY -m lrm.cli overopt --config configs/overopt_shapes_motion.yaml \
        --run_dir "$R/overopt_motion" --progress false --cache_workers 6
}
lane_D() {
    lane_V
}
lane_T() {
    job teacher_video $(( ${TEACHER_MIN:-10} * 60 + 120 )) $PY -m lrm.cli shapes train-teacher --kind video \
        --out_dir "$R/teacher_video" --init_from "${TEACHER_INIT:-distill/weights/teacher-video}" \
        --max_minutes "${TEACHER_MIN:-10}" --steps 20000 --batch_size 96 --num_samples 24000 --workers 6
}
lane_P() {  # A/B from scratch: the video teacher with and without temporal position embeddings, same budget
    local pe
    for pe in true false; do
        job "teacher_video_pe_$pe" $(( ${TEACHER_MIN:-10} * 60 + 120 )) $PY -m lrm.cli shapes train-teacher \
            --kind video --out_dir "$R/teacher_video_pe_$pe" --temporal_pos_embed "$pe" \
            --max_minutes "${TEACHER_MIN:-10}" --steps 20000 --batch_size 96 --num_samples 24000 --workers 4 &
    done
    wait
}
lane_V() {
    ablation ablation_video 720 --video --steps "${VIDEO_STEPS:-90}" --prompts "${PROMPTS:-16}" \
        --per_prompt "${PER_PROMPT:-8}" ${TEACHER_DIR:+--teacher "$TEACHER_DIR"}
}
lane_I() {  # the image rows at learning rates 3e-5 (2026-12-02: 1e-4 drifted off the captions) and beta_cd 1.0
    # (chosen on validation prompts with lane S, 2026-12-02; BENCHMARKS.md)
    ablation ablation_image 720 --steps "${IMAGE_STEPS:-240}" --prompts "${PROMPTS:-16}" --per_prompt "${PER_PROMPT:-8}" \
        --set lr_student=3e-5 --set lr_fake=3e-5 --set beta_cd=1.0
}
lane_S() {  # image VSD+CD settings chosen on validation prompts, reported on the test prompts. SWEEP holds
    # "NAME:ARGS;NAME:ARGS" (ARGS for every row of that variant, e.g. "lr1e5:--set lr_student=1e-5 --set lr_fake=1e-5");
    # each variant runs VSD+CD on --split val, and VSD+CD + VSD+CD+LRM on the test prompts (merged into NAME/test).
    # SWEEP_VAL_ONLY (same form) runs only the val row (for a setting whose test rows exist already).
    local sweep=() val_only=() entry name args row
    IFS=';' read -ra sweep <<<"${SWEEP:-}"
    IFS=';' read -ra val_only <<<"${SWEEP_VAL_ONLY:-}"
    for entry in "${sweep[@]}" "${val_only[@]}"; do
        name=${entry%%:*} args=${entry#*:}
        job "sweep_${name}_val" 720 $PY bench/distill_shapes_ablation.py --out "$R/sweep_image/$name/val" \
            --rows vsd_cd --split val --steps "${IMAGE_STEPS:-240}" --timing_repeats 0 $args &
    done
    for entry in "${sweep[@]}"; do
        name=${entry%%:*} args=${entry#*:}
        for row in vsd_cd vsd_cd_lrm; do
            job "sweep_${name}_$row" 720 $PY bench/distill_shapes_ablation.py --out "$R/sweep_image/$name/$row" \
                --rows $row --steps "${IMAGE_STEPS:-240}" --timing_repeats 0 $args &
        done
    done
    wait
    for entry in "${sweep[@]}"; do
        name=${entry%%:*}
        job "sweep_${name}_merge" 120 $PY bench/distill_shapes_ablation.py --out "$R/sweep_image/$name/test" \
            --merge "$R/sweep_image/$name/vsd_cd" "$R/sweep_image/$name/vsd_cd_lrm"
    done
}
lane_L() {
    job lrm_shapes_video 540 $PY bench/latent_rewards_shapes.py --out "$R/lrm_shapes_video" --workers 6 \
        --skip_images --no_ablations --n_videos 10000 --video_reward motion-magnitude,temporal-flickering \
        --text_video_reward shapes-direction,shapes-adherence --text_video_loss mse,mse+rank
}
lane_K() {
    job lrm_cost_train 480 $PY bench/latent_rewards_cost.py --part train --out "$R/lrm_cost_train.json" \
        --cache_workers 6
}

for lane in $LANES; do
    "lane_$lane" &
done
wait
echo "$(date -u +%H:%M:%S) all done" >>"$R/status"
