#!/usr/bin/env bash
# Issue 18's bench on one GPU, in three device calls of <= 9 min (bench/distill_shapes_ablation.py --suite tdm).
#
#   bash bench/device/tdm_ablation_run.sh teacher R   # call 1 (~8 min): the rectified-flow Shapes video teacher
#                                                     # (7 min) beside the mixed-latent-reward LRMs -> R/teacher_flow,
#                                                     # R/lrms
#   bash bench/device/tdm_ablation_run.sh val R       # call 2 (~8 min): the rows on validation prompts -> R/tdm_val
#   bash bench/device/tdm_ablation_run.sh test R      # call 3 (~8 min): the same on test prompts -> R/tdm_test
#
# R: the results folder; call 1 writes it ($OUT/tdm to get it back), calls 2-3 read R/teacher_flow/teacher and
# R/lrms (carry it: copy the returned folder into the checkout, e.g. runs/tdm, and pass carry ["runs/tdm", ...]).
# Device set-up as every device script: bench/device/env.sh (carry .whlsd, .dev/diffusers_trim.zip), plus a packed
# MiniLM (bench/device/pack_minilm.py) in MINILM_SITE (default .dev/minilm_site, carried) for the text encoder.
# Each row is its own process (tiny launch-bound networks leave the GPU idle); ROWS, STEPS and EXTRA (e.g.
# "--set beta_gan=1.0") change them. Settings are chosen on val (call 2); report the test table (call 3).
set -u
STAGE=${1:?usage: tdm_ablation_run.sh teacher|val|test RESULTS_DIR}
R=${2:?usage: tdm_ablation_run.sh teacher|val|test RESULTS_DIR}
mkdir -p "$R/logs"
source bench/device/env.sh
MINILM_SITE=${MINILM_SITE:-.dev/minilm_site}
[ -d "$MINILM_SITE" ] && cp -r "$MINILM_SITE"/* /tmp/site/
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TEACHER=${TEACHER:-$R/teacher_flow/teacher}
ROWS=${ROWS:-"vsd_cd vsd_cd_lrm tdm tdm_gan tdm_mixed_pixel tdm_mixed_latent tdm_gan_mixed_pixel tdm_gan_mixed_latent"}
STEPS=${STEPS:-150}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$R/gpu.txt"

job() {  # job NAME SECONDS CMD...
    local name=$1 limit=$2 t0=$(date +%s)
    shift 2
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$R/logs/$name.log" 2>&1
    echo "$(date -u +%H:%M:%S) $name rc=$? $(($(date +%s) - t0))s" | tee -a "$R/status"
}

case $STAGE in
teacher)
    job teacher_flow 470 python3 -m lrm.cli shapes train-teacher --kind video --parameterization flow \
        --out_dir "$R/teacher_flow" --max_minutes 7 --steps 20000 --batch_size 96 --num_samples 24000 --workers 12 &
    job lrms 470 python3 bench/distill_shapes_ablation.py --suite tdm --fit_lrms_only --lrm_dir "$R/lrms" \
        --out "$R/lrm_fit" --lrm_records 4096 --lrm_steps 1500 &
    wait
    rm -rf "$R/teacher_flow/checkpoint"  # optimizer state: not needed by the bench, keeps the returned folder small
    tail -3 "$R/logs/teacher_flow.log" "$R/logs/lrms.log"
    ;;
val | test)
    [ -f "$TEACHER/denoiser.json" ] || { echo "no teacher at $TEACHER: run the teacher stage first" >&2; exit 1; }
    parts=()
    for row in $ROWS; do
        job "${STAGE}_$row" 430 python3 bench/distill_shapes_ablation.py --suite tdm --split "$STAGE" \
            --teacher "$TEACHER" --lrm_dir "$R/lrms" --rows "$row" --out "$R/tdm_$STAGE/$row" --steps "$STEPS" \
            --timing_repeats 0 ${EXTRA:-} &
        parts+=("$R/tdm_$STAGE/$row")
    done
    wait
    job "${STAGE}_merge" 60 python3 bench/distill_shapes_ablation.py --out "$R/tdm_$STAGE" --merge "${parts[@]}" \
        --retime
    cat "$R/tdm_$STAGE/ablation.md"
    ;;
*) echo "stage must be teacher, val or test, got $STAGE" >&2; exit 2 ;;
esac
