#!/usr/bin/env bash
# Every command of the README's "On your own model" section on a Stable-Diffusion-1.5-sized pipeline with random
# weights at full size (860M UNet, SD VAE, CLIP-L text encoder; 512 px -> 4x64x64 latents), on one GPU, with the
# shipped configs/sd15_*.yaml unchanged except for step counts (kept small: this checks that each command runs and
# measures its time and peak GPU memory, it trains nothing useful).
#
#   bench/sd15_workflow.sh OUT_DIR [STAGES]     # STAGES: any of setup cache train evaluate distill distill_lora
#                                               #   export finetune_lrm finetune_ddpo finetune_direct finetune_lora
#                                               #   overopt eval (default: all, in order)
#
# Each command runs under bench/device/gpu_peak.py: OUT_DIR/steps.jsonl gets one line per command (wall seconds, peak
# GPU memory from nvidia-smi, exit code) and OUT_DIR/logs/NAME.log its output. Stages whose output exists are
# skipped, so a second call on the same machine continues where the first stopped. Resume is checked by running
# distill and each finetune method twice (the second run continues from the first run's checkpoint).
set -uo pipefail
OUT=${1:?usage: bench/sd15_workflow.sh OUT_DIR [STAGES]}
shift
STAGES=${*:-setup cache train evaluate distill distill_lora export finetune_lrm finetune_ddpo finetune_direct \
finetune_lora overopt eval}
mkdir -p "$OUT/logs"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
LRM="$PY -m lrm.cli"
R=runs/sd15

run() {  # run NAME CMD...: timed, peak GPU memory, log; a failure is recorded and the workflow goes on
    local name=$1
    shift
    echo "$(date -u +%H:%M:%S) $name: $*"
    $PY bench/device/gpu_peak.py --log "$OUT/steps.jsonl" --name "$name" -- "$@" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "$(date -u +%H:%M:%S) $name rc=$rc"
    [ $rc -eq 0 ] || tail -5 "$OUT/logs/$name.log"
    return $rc
}

ckpt_info() {  # ckpt_info NAME DIR: size of a checkpoint directory and the save lines of its log
    du -sb "$2" 2>/dev/null | awk -v n="$1" '{printf "{\"name\": \"%s\", \"checkpoint_bytes\": %d}\n", n, $1}' \
        >>"$OUT/checkpoints.jsonl"
}

for stage in $STAGES; do
    case $stage in
    setup)
        [ -f $R/pipeline/model_index.json ] || run make_pipeline $PY bench/device/make_sd15_pipeline.py --out $R/pipeline
        [ -f $R/images/captions.csv ] || run make_images $PY bench/device/make_image_folder.py --out $R/images --num 512
        # held-out prompts for eval / overopt: captions of other renders (seed 1)
        [ -f $R/eval_prompts.txt ] || $PY -c "from shapes import ShapesWorld; print('\n'.join(ShapesWorld(seed=1).batch(list(range(16)))[1]))" >$R/eval_prompts.txt
        ;;
    cache) [ -f $R/cache/manifest.json ] || run cache $LRM cache build --config configs/sd15_cache.yaml ;;
    train) [ -f $R/lrm-colorfulness/model.safetensors ] || run train $LRM train --config configs/sd15_lrm.yaml \
        --steps 300 --eval_every 100 ;;
    evaluate) run evaluate $LRM evaluate --lrm_dir $R/lrm-colorfulness --cache_dir $R/cache ;;
    distill)
        if [ ! -f $R/distill/student/denoiser.json ]; then
            run distill $LRM distill --config configs/sd15_distill.yaml --steps 2 --ckpt_every 2 --sample_every 2
            ckpt_info distill $R/distill/checkpoint
            run distill_resume $LRM distill --config configs/sd15_distill.yaml --steps 3 --ckpt_every 2 \
                --sample_every 2 --final_checkpoint false
            rm -rf $R/distill/checkpoint  # 3 UNets + 2 AdamW states; the student/ folder is what the next steps use
        fi
        ;;
    distill_lora)  # configs/sd15_distill_lora.yaml: one frozen UNet + student / fake / CD-target adapters
        if [ ! -f $R/distill_lora/student/student.json ]; then
            run distill_lora $LRM distill --config configs/sd15_distill_lora.yaml --steps 2 --ckpt_every 2 \
                --sample_every 2
            ckpt_info distill_lora $R/distill_lora/checkpoint
            run distill_lora_resume $LRM distill --config configs/sd15_distill_lora.yaml --steps 3 --ckpt_every 2 \
                --sample_every 2 --final_checkpoint false
        fi
        ;;
    export)  # each student that exists, as a diffusers pipeline (student UNet + LCMScheduler) that samples
        for d in distill distill_lora; do
            [ -f $R/$d/student/student.json ] || continue
            run "export_$d" $LRM export --student $R/$d/student --teacher $R/pipeline --out $R/export_$d --overwrite \
                && run "export_${d}_sample" $PY -c "import torch, diffusers, json; p = diffusers.DiffusionPipeline.\
from_pretrained('$R/export_$d').to('cuda'); c = json.load(open('$R/export_$d/lrm_export.json'))['pipeline_call']; \
im = p('a red circle on a blue background', output_type='np', **c).images; print(type(p).__name__, \
type(p.scheduler).__name__, im.shape, float(im.mean()))"
        done
        ;;
    finetune_lora)  # lrm finetune from the LoRA student (fused into the teacher) with new LoRA adapters
        if [ ! -f $R/finetune-lora/summary.json ]; then
            run finetune_lora $LRM finetune --config configs/sd15_finetune.yaml --method lrm \
                --teacher $R/distill_lora/student --lora_rank 64 --run_dir $R/finetune-lora --steps 2 --ckpt_every 2 \
                --eval_every 2 --sample_every 2
        fi
        ;;
    finetune_lrm | finetune_ddpo | finetune_direct)
        m=${stage#finetune_}
        if [ ! -f $R/finetune-$m/summary.json ]; then
            run "finetune_$m" $LRM finetune --config configs/sd15_finetune.yaml --method $m --run_dir $R/finetune-$m \
                --steps 2 --ckpt_every 2 --eval_every 2 --sample_every 2
            ckpt_info "finetune_$m" $R/finetune-$m/checkpoint
            run "finetune_${m}_resume" $LRM finetune --config configs/sd15_finetune.yaml --method $m \
                --run_dir $R/finetune-$m --steps 3 --ckpt_every 2 --eval_every 2 --sample_every 2
            rm -rf $R/finetune-$m/checkpoint
        fi
        ;;
    overopt) [ -f $R/overopt/summary.json ] || run overopt $LRM overopt --config configs/sd15_overopt.yaml \
        --steps 2 --eval_every 1 --lrm_steps 200 --num_eval_prompts 8 ;;
    eval) run eval $LRM eval --config configs/sd15_eval.yaml --denoiser $R/finetune-lrm/student ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
grep -h "checkpoint\b.*saved\|saved checkpoint\|checkpoint .* MB\|checkpoint .* GB" "$OUT"/logs/*.log >"$OUT/checkpoint_saves.txt" 2>/dev/null
cat "$OUT/steps.jsonl"
