"""Export a distilled k-step student as a diffusers pipeline directory (``lrm export``).

``export_diffusers(student_dir, teacher, out_dir)`` writes a ``StableDiffusionPipeline`` directory: the teacher
pipeline's components (vae, text_encoder, tokenizer, safety checker, ...; copied, or symlinked with ``link=True``),
the student's UNet as ``unet/`` and an ``LCMScheduler`` as ``scheduler/``, so that

    pipe = DiffusionPipeline.from_pretrained(out_dir)
    pipe(prompt, num_inference_steps=k, guidance_scale=1.0)        # k = len(student.json's timesteps)

samples the student as ``distill.samplers.k_step_sample`` does (tests/distill/test_export.py: equal within float
rounding for the same initial latents and the same generator).

Why ``LCMScheduler`` reproduces our sampler, step by step (``k_step_sample`` with the trainers' ``student_x0``):
1. x0 from the network output: ``epsilon`` / ``v_prediction`` / ``sample`` = our ``eps`` / ``v`` / ``x0``
   (``conjugate_v`` and ``flow`` students have no LCMScheduler counterpart and are refused).
2. The consistency function ``c_skip(t) x_t + c_out(t) x0`` with LCM's scalings (``distill.cd.boundary_scalings``);
   ``timestep_scaling`` is a scheduler config key; ``sigma_data`` is hard-coded 0.5 in LCMScheduler, so a student
   trained with another sigma_data is refused.
3. Re-noising with fresh noise to the next timestep, ``sqrt(abar_s) f + sqrt(1 - abar_s) z`` (our
   ``schedule.add_noise``); the last step returns ``f``. Noise draws: ours ``torch.randn(shape, generator=g,
   device=g.device)``, LCMScheduler's ``randn_tensor(shape, generator=g)``: the same numbers, in the same order
   (k - 1 draws of the latents' shape), for one ``torch.Generator`` and initial ``latents=`` given (the pipeline
   draws the initial noise from the same generator only when ``latents`` is not given). A list of per-sample
   generators draws sample by sample: different numbers from our one batched draw.
4. Timesteps: ``original_inference_steps`` is set to ``num_train_timesteps`` (a grid of every timestep), so
   ``num_inference_steps=k`` gives LCM's evenly spaced ``[999, 749, 499, 249]`` / ``[999, 499]`` / ``[999]``, our
   defaults (``STUDENT_TIMESTEPS``); other student timesteps are passed as ``timesteps=[...]`` (``lrm_export.json``
   says which). No CFG: our student sampler calls the student once (``guidance_scale=None``); the pipeline does
   the same at ``guidance_scale <= 1``.
Differences that remain: abar's square roots in float32 (diffusers) against float64 then float32 (ours), at most
~1e-7 relative (on CPU fp32 the tiny pipeline's samples are bitwise equal); and the pipeline's text conditioning is
its own CLIP text encoder with ``prompt``, ``prompt_embeds=`` passes ours.

Supported: UNet students (``UNet2DConditionModel``) of a ``StableDiffusionPipeline`` teacher, full weights or LoRA
(a ``pytorch_lora_weights.safetensors`` student folder: the adapter is fused into the base network it was trained on,
``student.json``'s ``lora.base_path``, with ``distill.lora.load_lora_student``, and the fused UNet is written).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lrm.config import ConfigError

SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
SUPPORTED_STUDENTS = ("UNet2DConditionModel",)
# our parameterisation -> LCMScheduler's prediction_type
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# the teacher scheduler's keys that define the training noise schedule (copied into the LCMScheduler config)
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")
# files of a diffusers model folder (the rest of a student/ folder is ours: denoiser.json, null_text, student.json)
_MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _is_lora(student_dir: Path) -> bool:
    from distill.lora import is_lora_student

    return is_lora_student(student_dir) and not (student_dir / "denoiser.json").is_file()


def _check_class(name: str | None, where: Path) -> None:
    if name not in SUPPORTED_STUDENTS:
        raise ConfigError(f"the student in {where} is a {name!r}; lrm export supports {list(SUPPORTED_STUDENTS)} "
                          f"students of {list(SUPPORTED_PIPELINES)} teachers")


def _student_meta(student_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(student.json, denoiser.json)`` of a student folder (LoRA: the ``lora.denoiser`` record), refusing what
    cannot be exported."""
    if not (student_dir / "student.json").is_file():
        raise ConfigError(f"{student_dir / 'student.json'} is missing: not a student folder (pass the student/ "
                          "directory that `lrm distill` / `lrm finetune` wrote)")
    student = _read_json(student_dir / "student.json")
    if _is_lora(student_dir):  # the network class is the base's: checked against the teacher's UNet
        den = (student.get("lora") or {}).get("denoiser")
        if not den:
            raise ConfigError(f"{student_dir / 'student.json'} does not describe the LoRA student's network "
                              "(lora.denoiser): written by an older version; re-export it with merge_lora: true")
        den = dict(den, model_class=SUPPORTED_STUDENTS[0])
    elif not (student_dir / "denoiser.json").is_file():
        raise ConfigError(f"{student_dir / 'denoiser.json'} is missing: the student folder is incomplete")
    else:
        den = _read_json(student_dir / "denoiser.json")
    _check_class(den.get("model_class"), student_dir)
    par = student.get("parameterization", den.get("parameterization"))
    if par not in PREDICTION_TYPE:
        raise ConfigError(f"the student predicts {par!r}; diffusers' LCMScheduler takes "
                          f"{sorted(PREDICTION_TYPE)} (prediction_type {sorted(PREDICTION_TYPE.values())}); "
                          "distil with parameterization: heterogeneous (x0) to export")
    cf = student.get("consistency_function") or {}
    if float(cf.get("sigma_data", 0.5)) != 0.5:
        raise ConfigError(f"the student was trained with sigma_data={cf['sigma_data']}; diffusers' LCMScheduler "
                          "hard-codes sigma_data = 0.5 in its boundary scalings, so its samples would differ")
    if not student.get("timesteps"):
        raise ConfigError(f"{student_dir / 'student.json'} records no timesteps")
    return student, den


def _teacher_dir(teacher: str | os.PathLike, cache_dir: str | None) -> Path:
    """A local pipeline directory for ``teacher`` (a directory, or a hub id from the local cache / the hub)."""
    p = Path(teacher)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ConfigError(f"{p / 'model_index.json'} is missing: the teacher must be a diffusers pipeline "
                              "directory (pipeline.save_pretrained(DIR)) or a hub id")
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(teacher), cache_dir=cache_dir or os.environ.get("LRM_CACHE_DIR")))
    except Exception as e:  # offline / unknown repo
        raise ConfigError(f"cannot find the teacher pipeline {str(teacher)!r}: not a local directory, and the hub "
                          f"says: {type(e).__name__}: {e}. Offline: run `huggingface-cli download REPO --local-dir "
                          "DIR` on a connected machine and pass DIR") from None


def lcm_scheduler_config(teacher_scheduler: dict[str, Any], prediction_type: str, timestep_scaling: float
                         ) -> dict[str, Any]:
    """LCMScheduler keyword arguments: the teacher's training noise schedule, our prediction type and scaling,
    ``original_inference_steps = num_train_timesteps`` (see the module doc, 4), no clipping, ``set_alpha_to_one``."""
    kw = {k: teacher_scheduler[k] for k in _SCHEDULE_KEYS if teacher_scheduler.get(k) is not None}
    T = int(kw.get("num_train_timesteps", 1000))
    kw.update(original_inference_steps=T, prediction_type=prediction_type, timestep_scaling=float(timestep_scaling),
              clip_sample=False, thresholding=False, set_alpha_to_one=True, steps_offset=0)
    return kw


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def export_diffusers(student_dir: str | os.PathLike, teacher: str | os.PathLike, out_dir: str | os.PathLike, *,
                     link: bool = False, overwrite: bool = False, cache_dir: str | None = None) -> Path:
    """Write ``out_dir``: the teacher pipeline with the student's UNet and an LCMScheduler (module doc).

    Args:
        student_dir: a ``student/`` folder of ``lrm distill`` / ``lrm finetune`` (``save_student``).
        teacher: the teacher's diffusers pipeline directory or hub id (its vae, text encoder, tokenizer, ... are used).
        out_dir: where the pipeline directory is written (must not exist unless ``overwrite``).
        link: symlink the teacher's component folders instead of copying them.
    Returns ``out_dir``; ``out_dir/lrm_export.json`` records how to call the pipeline.
    """
    import torch
    from diffusers import LCMScheduler

    from lrm.schedules import schedule_from_dict

    student_dir, out = Path(student_dir), Path(out_dir)
    student, den = _student_meta(student_dir)
    tdir = _teacher_dir(teacher, cache_dir)
    index = _read_json(tdir / "model_index.json")
    if index.get("_class_name") not in SUPPORTED_PIPELINES:
        raise ConfigError(f"the teacher {str(teacher)!r} is a {index.get('_class_name')!r}; lrm export supports "
                          f"{list(SUPPORTED_PIPELINES)} (UNet students of Stable-Diffusion-class pipelines)")
    if out.exists():
        if not overwrite:
            raise ConfigError(f"{out} exists; pass overwrite (--overwrite) to replace it")
        shutil.rmtree(out)

    # 1. the scheduler, checked against the student's noise schedule
    sch_cfg = _read_json(tdir / "scheduler" / "scheduler_config.json")
    cf = student.get("consistency_function") or {}
    par = student.get("parameterization", den.get("parameterization"))
    scheduler = LCMScheduler(**lcm_scheduler_config(sch_cfg, PREDICTION_TYPE[par],
                                                    float(cf.get("timestep_scaling", 10.0))))
    ours = schedule_from_dict(den["schedule"])
    same_T = ours.num_train_timesteps == scheduler.config.num_train_timesteps
    if getattr(ours, "alphas_cumprod", None) is None or not same_T \
            or not torch.allclose(ours.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=0, atol=1e-6):
        raise ConfigError(f"the student's noise schedule ({den['schedule']}) is not the teacher pipeline's "
                          f"({tdir / 'scheduler' / 'scheduler_config.json'}); pass the teacher it was distilled from")
    timesteps = [int(t) for t in student["timesteps"]]
    if timesteps != sorted(set(timesteps), reverse=True):
        raise ConfigError(f"student.json timesteps {timesteps} are not distinct and descending")
    scheduler.set_timesteps(len(timesteps))
    default_ok = scheduler.timesteps.tolist() == timesteps

    # 2. the teacher's other components, the student's UNet, the scheduler, model_index.json
    lora = _is_lora(student_dir)
    if lora:
        _check_class(_read_json(tdir / "unet" / "config.json").get("_class_name"), tdir / "unet")
    files = [] if lora else [f for f in _MODEL_FILES if (student_dir / f).is_file()]
    if not lora and ("config.json" not in files or len(files) < 2):
        raise ConfigError(f"{student_dir} has no diffusers UNet weights (config.json + "
                          "diffusion_pytorch_model.safetensors)")
    out.mkdir(parents=True)
    for entry in sorted(tdir.iterdir()):
        if entry.name in ("unet", "scheduler", "model_index.json") or entry.name.startswith("."):
            continue
        _place(entry, out / entry.name, link)
    if lora:  # fused into its base network, written as a full UNet
        from distill.denoiser import Denoiser
        from distill.lora import load_lora_student

        load_lora_student(student_dir, lambda base: Denoiser.from_diffusers(base)).model.save_pretrained(out / "unet")
    else:
        (out / "unet").mkdir()
    for f in files:
        shutil.copy2(student_dir / f, out / "unet" / f)
    if (student_dir / "diffusion_pytorch_model.safetensors.index.json").is_file():  # sharded weights
        for shard in student_dir.glob("diffusion_pytorch_model-*.safetensors"):
            shutil.copy2(shard, out / "unet" / shard.name)
    scheduler.save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    call = {"num_inference_steps": len(timesteps), "guidance_scale": 1.0}
    if not default_ok:
        call = {"timesteps": timesteps, "guidance_scale": 1.0}
    (out / "lrm_export.json").write_text(json.dumps({
        "student": str(student_dir), "teacher": str(teacher), "timesteps": timesteps, "parameterization": par,
        "prediction_type": PREDICTION_TYPE[par], "consistency_function": cf, "pipeline_call": call,
        "note": "guidance_scale <= 1: no CFG, as the student sampler (distill.samplers.k_step_sample)",
    }, indent=2) + "\n")
    return out


# ---- CLI -------------------------------------------------------------------------------------------------------
def _args(p: Any) -> None:
    p.add_argument("--student", required=True, help="student/ folder written by lrm distill / lrm finetune")
    p.add_argument("--teacher", required=True, help="the teacher's diffusers pipeline directory or hub id")
    p.add_argument("--out", required=True, help="output pipeline directory")
    p.add_argument("--link", action="store_true", help="symlink the teacher's components instead of copying them")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _run(ns: Any) -> Path:
    out = export_diffusers(ns.student, ns.teacher, ns.out, link=ns.link, overwrite=ns.overwrite)
    call = _read_json(out / "lrm_export.json")["pipeline_call"]
    print(f"wrote {out}: DiffusionPipeline.from_pretrained({str(out)!r})(prompt, "
          + ", ".join(f"{k}={v}" for k, v in call.items()) + ")")
    return out


def register(subparsers: Any) -> None:
    from lrm.cli import add_command

    add_command(subparsers, "export", _run, args=_args,
                help="export a distilled student as a diffusers pipeline directory (student UNet + LCMScheduler)")


__all__ = ["export_diffusers", "lcm_scheduler_config", "SUPPORTED_PIPELINES", "PREDICTION_TYPE"]
