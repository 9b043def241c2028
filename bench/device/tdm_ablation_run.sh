#!/usr/bin/env bash
# Issue 18's bench on one GPU, in two device calls of <= 9 min (bench/distill_shapes_ablation.py --suite tdm).
#
#   bash bench/device/tdm_ablation_run.sh teacher R   # call 1 (~8 min): the rectified-flow Shapes video teacher
#       (6.5 min, from the shipped DDPM video teacher's weights) beside the mixed-latent-reward LRMs -> R/teacher_flow,
#       R/lrms, then a few-step smoke of every row on shapes-video -> R/smoke (catches a GPU-only failure early)
#   bash bench/device/tdm_ablation_run.sh rows R      # call 2 (~8 min): every row trained once, scored on the
#       validation and the test prompts -> R/tdm_val, R/tdm_test (one table each, sampling retimed alone)
#   bash bench/device/tdm_ablation_run.sh all R       # both in one call: TEACHER_MIN=4.5 TEACHER_LIMIT=330 SMOKE=0
#       STEPS=80 ROW_LIMIT=230 (~9.5 min)
# Keep R inside the checkout (e.g. runs/tdm, git-ignored): a warm machine keeps it between calls; tar it into $OUT.
# Both tables in one call (~8.5 min on an H100, the teacher shipped; BENCHMARKS.md "The TDM ablation on one H100"):
#   TEACHER=shapes-video-flow STEPS=300 ROW_LIMIT=440 EXTRA="--set max_gpu_seconds=300 --teacher_cfg 3.5"
#   timeout 560 bash bench/device/tdm_ablation_run.sh rows runs/tdm (rows stop at 300 steps or 300 s of training,
#   whichever first: each row records the steps it ran; rows start ~55 s in, score val then test ~40 s after training,
#   the two reference processes take ~220 s each). SPLITS=test gives the test table alone (settings chosen on an
#   earlier val run). The tracked tree (~35 MB) + the MiniLM pack (~34 MB) exceed the 64 MiB a call sends:
#   `bash bench/device/slim_tree.sh on docs` before the call (and `... off` right after) leaves room for the pack,
#   diffusers, the wheels and runs/tdm/lrms (else the stage fits the LRMs first, ~60 s).
#
# R: the results folder; call 1 writes it ($OUT/tdm to get it back), call 2 reads R/teacher_flow/teacher and
# R/lrms (carry it: copy the returned folder into the checkout, e.g. runs/tdm, and pass carry ["runs/tdm", ...]).
# Device set-up as every device script: bench/device/env.sh (carry .whlsd, .dev/diffusers_trim.zip), plus a packed
# MiniLM (`python bench/device/pack_minilm.py --out .dev`) in MINILM_SITE (default .dev/site, carried).
# Each row is its own process (tiny launch-bound networks leave the GPU idle); ROWS, STEPS, ROW_LIMIT and EXTRA (e.g.
# "--set beta_gan=1.0") change them. Settings are chosen on the val table; the test table is the reported one.
set -u
STAGE=${1:?usage: tdm_ablation_run.sh teacher|rows RESULTS_DIR}
R=${2:?usage: tdm_ablation_run.sh teacher|rows RESULTS_DIR}
mkdir -p "$R/logs"
source bench/device/env.sh
MINILM_SITE=${MINILM_SITE:-.dev/site}
[ -d "$MINILM_SITE" ] && cp -r "$MINILM_SITE"/* /tmp/site/
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TEACHER=${TEACHER:-$R/teacher_flow/teacher}  # or shapes-video-flow: the shipped one
ROWS=${ROWS:-"vsd_cd vsd_cd_lrm tdm tdm_gan tdm_mixed_pixel tdm_mixed_latent tdm_gan_mixed_pixel tdm_gan_mixed_latent"}
STEPS=${STEPS:-150}
SPLITS=${SPLITS:-val,test}  # or one of them (e.g. the test table of settings chosen on an earlier val run)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$R/gpu.txt"

job() {  # job NAME SECONDS CMD...
    local name=$1 limit=$2 t0=$(date +%s)
    shift 2
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$R/logs/$name.log" 2>&1
    local rc=$?  # before any command substitution resets $?
    echo "$(date -u +%H:%M:%S) $name rc=$rc $(($(date +%s) - t0))s" | tee -a "$R/status"
}

teacher_stage() {
    job teacher_flow "${TEACHER_LIMIT:-480}" python3 -m lrm.cli shapes train-teacher --kind video \
        --parameterization flow --init_from distill/weights/teacher-video --out_dir "$R/teacher_flow" \
        --max_minutes "${TEACHER_MIN:-6.5}" --steps 20000 --batch_size 96 --num_samples 24000 --workers 12 &
    (
        job lrms 300 python3 bench/distill_shapes_ablation.py --suite tdm --fit_lrms_only --lrm_dir "$R/lrms" \
            --out "$R/lrm_fit" --lrm_records 4096 --lrm_steps 1500
        [ "${SMOKE:-1}" = 1 ] && job smoke 300 python3 bench/distill_shapes_ablation.py --suite tdm --split val,test \
            --teacher shapes-video --lrm_dir "$R/lrms" --out "$R/smoke" --steps 6 --prompts 2 --per_prompt 2 \
            --teacher_steps 5 --frechet_n 64 --frechet_boot 10 --timing_repeats 0
    ) &
    wait
    rm -rf "$R/teacher_flow/checkpoint"  # optimizer state: not needed by the bench
}

rows_stage() {
    case $TEACHER in shapes-*) ;; *) [ -f "$TEACHER/denoiser.json" ] ||
        { echo "no teacher at $TEACHER: run the teacher stage first" >&2; exit 1; } ;; esac
    [ -d "$R/lrms" ] || job lrms 300 python3 bench/distill_shapes_ablation.py --suite tdm --fit_lrms_only \
        --lrm_dir "$R/lrms" --out "$R/lrm_fit" --lrm_records 4096 --lrm_steps 1500
    # the teacher and the untrained baseline once (rows none), read by every row process (--reference)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # 8+ processes on 16 cores: no oversubscribed CPU scoring
    # one reference process per split (its 50-step CFG teacher on the FD set takes ~220 s beside 10 row processes);
    # a split's prompts and noise depend on its name only, so R/reference/<split> is what the rows' --reference reads
    split_dir() {  # split_dir DIR SPLIT: where a --split "$SPLITS" run under DIR keeps SPLIT's table (one split: DIR)
        if [ "$SPLITS" = "$2" ]; then echo "$1"; else echo "$1/$2"; fi
    }
    for split in ${SPLITS//,/ }; do
        job "reference_$split" "${REF_LIMIT:-300}" python3 bench/distill_shapes_ablation.py --suite tdm --split "$split" \
            --teacher "$TEACHER" --lrm_dir "$R/lrms" --rows none --out "$(split_dir "$R/reference" "$split")" \
            --timing_repeats 0 ${EXTRA:-} &
    done
    row_job() {  # row_job JOB_NAME OUT_DIR ROW [BENCH ARGS...]: one row, trained once, scored on every split
        local name=$1 dir=$2 row=$3
        shift 3
        job "$name" "${ROW_LIMIT:-400}" python3 bench/distill_shapes_ablation.py --suite tdm --split "$SPLITS" \
            --teacher "$TEACHER" --lrm_dir "$R/lrms" --rows "$row" --out "$dir" --steps "$STEPS" \
            --timing_repeats 0 --reference "$R/reference" ${EXTRA:-} "$@"
    }
    for row in $ROWS; do row_job "row_$row" "$R/rows/$row" "$row" & done
    # VARIANT_ROWS with VARIANT_EXTRA (e.g. "--set beta_temporal=50"): the same rows with another setting, beside the
    # others (their own tables in R/variants/<row>/{val,test}: a changed setting is another set-up, not merged)
    for row in ${VARIANT_ROWS:-}; do
        row_job "variant_$row" "$R/variants/$row" "$row" ${VARIANT_EXTRA:?give VARIANT_EXTRA} &
    done
    wait
    # every table at once, sampling retimed in each merge process (MERGE_FLAGS= : each row keeps its own timing)
    for split in ${SPLITS//,/ }; do
        job "merge_$split" 90 python3 bench/distill_shapes_ablation.py --out "$R/tdm_$split" ${MERGE_FLAGS---retime} \
            --merge $(for row in $ROWS; do d=$(split_dir "$R/rows/$row" "$split"); [ -f "$d/ablation.json" ] && echo "$d"
                      done) &
    done
    wait
    for split in ${SPLITS//,/ }; do cat "$R/tdm_$split/ablation.md"; done
}

case $STAGE in
teacher) teacher_stage ;;
rows) rows_stage ;;
all) teacher_stage; rows_stage ;;  # both in one call (TEACHER_MIN, STEPS and ROW_LIMIT sized to fit)
*) echo "stage must be teacher, rows or all, got $STAGE" >&2; exit 2 ;;
esac
# what comes back small: the students' and fake scores' weights stay behind (the teacher and the LRMs are kept)
find "$R" -name '*.safetensors' -not -path "$R/teacher_flow/teacher/*" -not -path "$R/lrms/*" -delete
du -sh "$R"
