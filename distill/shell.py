"""The shell both student trainers share (``lrm distill``'s ``DistillTrainer``, ``lrm finetune``'s
``FinetuneTrainer``): ``ShellConfig``, the model and run-control keys of their configs (and which of them a resumed
run may change), and ``StudentShell``, the run-dir set-up with the resume checks, log.csv / TensorBoard, sample grids
and the student export. What is left per trainer: its objective terms, its step, its checkpoint contents and its
loop's hooks (issue 18 moves those behind one interface)."""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distill.builders import ModelSpec
from lrm.checkpoint import find_checkpoint
from lrm.config import ConfigError, opt
from lrm.run import check_resume, clear_checkpoints, prepare_run_dir, record_run

# run-control keys a resumed run may change (how long, how often it reports; not what it trains)
SHELL_MUTABLE_KEYS = ("steps", "resume", "overwrite", "progress", "log_every", "ckpt_every", "sample_every",
                      "final_checkpoint", "student_fp16", "max_nonfinite_steps", "num_sample_prompts",
                      "samples_per_prompt", "vae_chunk_size", "device", "merge_lora")


@dataclass
class ShellConfig(ModelSpec):
    """Model keys (``ModelSpec``) + the run control every student trainer has."""

    log_every: int = opt(10, "log to log.txt every N steps (log.csv gets every step)")
    final_checkpoint: bool = opt(True, "save a resumable checkpoint at the end of the run (before a final "
                                       "evaluation); the student/ folder is written either way")
    max_nonfinite_steps: int = opt(10, "steps with a non-finite reward batch, loss or gradient are skipped (logged, "
                                       "never applied); more than this many in a row stop the run")
    student_fp16: bool = opt(False, "write the student/ folder's weights in fp16 (half the size; loaded back as "
                                    "fp32); checkpoints keep the training precision for an exact resume")
    num_sample_prompts: int = opt(8, "prompts in the sample grid")
    samples_per_prompt: int = opt(4, "samples per prompt in the grid")
    resume: bool = opt(True, "continue from run_dir/checkpoint when it exists (the same run only: a changed config "
                             "or input is refused, see overwrite)")
    overwrite: bool = opt(False, "start over in run_dir: delete its checkpoint first")
    progress: bool = opt(True, "tqdm progress bar")
    # ---- LoRA (distill/lora.py) ----------------------------------------------------------------------------
    lora_rank: int = opt(0, "LoRA rank of the student (and fake score / CD target) adapters on one frozen base "
                            "network; 0 = full fine-tuning")
    lora_alpha: int = opt(0, "LoRA alpha (the adapter's output is scaled by alpha / rank); 0 = lora_rank (scale 1, "
                             "as diffusers' LoRA training scripts)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapters' input, in [0, 1)")
    lora_target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"],
                                         "module names (suffixes) that get adapters; default: the attention "
                                         "projections diffusers' LoRA training scripts target")
    merge_lora: bool = opt(False, "lora_rank > 0: the student/ export is a full Denoiser directory with the adapter "
                                  "fused into the base weights, instead of pytorch_lora_weights.safetensors (the "
                                  "diffusers LoRA format, loaded onto the teacher's pipeline)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_alpha < 0:
            raise ConfigError(f"lora_alpha must be >= 0 (0 = lora_rank), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: name the layers that get adapters, e.g. "
                              "[to_q, to_k, to_v, to_out.0]")
        if self.merge_lora and self.lora_rank == 0:
            raise ConfigError("merge_lora: true needs lora_rank > 0 (a full fine-tuning run exports full weights)")




class StudentShell:
    """The run shell both student trainers use: run-dir set-up with the resume checks, log.csv (+ TensorBoard), sample
    grids and the student export. A trainer provides ``config`` (a ``ShellConfig``), ``step``, ``logger``,
    ``LOG_COLUMNS``, ``is_main``, ``load_checkpoint()`` and, for TensorBoard, ``TB_PREFIX``."""

    LOG_COLUMNS: list[str] = []
    TB_PREFIX: str | None = None
    _tb: Any = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.run_dir) / "checkpoint"

    @property
    def _csv_path(self) -> Path:
        return Path(self.config.run_dir) / "log.csv"

    def _start_run(self, inputs: dict[str, Any], mutable: tuple[str, ...], logger_name: str,
                   barrier: Callable[[], None] = lambda: None) -> bool:
        """``--overwrite``; the resume check against run.json (before anything is written); config.yaml + run.json;
        the checkpoint (unless this trainer is already past step 0 in memory); log.csv. Returns whether it resumed."""
        cfg = self.config
        if cfg.overwrite and self.is_main:
            clear_checkpoints(cfg.run_dir, self.checkpoint_dir)
        barrier()
        on_disk = self.step == 0 and cfg.resume and find_checkpoint(self.checkpoint_dir) is not None
        if on_disk:  # every rank: all raise alike
            check_resume(cfg.run_dir, cfg, inputs, mutable)
        if self.is_main:
            prepare_run_dir(cfg.run_dir, cfg, logger_name=logger_name)
            record_run(cfg.run_dir, cfg, inputs)
        resumed = self.step > 0
        if on_disk:
            self.load_checkpoint()
            resumed = True
            self.logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        self._open_logs(resumed)
        return resumed

    def _open_logs(self, resumed: bool) -> None:
        """log.csv: a resumed run keeps its rows up to the checkpoint's step (later ones were not saved)."""
        if not self.is_main:
            return
        rows = []
        if resumed and self._csv_path.exists():
            with open(self._csv_path) as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= self.step]
        self._csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        if self.TB_PREFIX and getattr(self.config, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(self.config.run_dir) / "tb"))
            except ImportError:
                self._tb = None

    def _log_row(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self._csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.LOG_COLUMNS).writerow({k: row.get(k, "") for k in self.LOG_COLUMNS})
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{self.TB_PREFIX}/{k}", v, row["step"])

    def write_grid(self, pixels: torch.Tensor, tag: str | None, per_row: int) -> Path:
        """run_dir/samples/<tag or step_N>.png (+ .gif for videos): ``pixels`` (N, 3, H, W) or (N, T, 3, H, W)."""
        from shapes.grid import save_gif, save_grid, save_video_strip

        out = Path(self.config.run_dir) / "samples"
        name = tag or f"step_{self.step:06d}"
        if pixels.dim() == 5:
            save_gif(pixels, out / f"{name}.gif", nrow=per_row)
            return save_video_strip(pixels, out / f"{name}.png")
        return save_grid(pixels, out / f"{name}.png", nrow=per_row, scale=2)

    def export_student(self, student: Any, directory: str | Path | None, meta: dict[str, Any]) -> Path:
        """``student`` (a Denoiser) as a Denoiser directory (fp16 with ``student_fp16``) + ``student.json``
        (timesteps, parameterisation, boundary scalings, step, and ``meta``).

        LoRA (``lora_rank > 0``): the student adapter as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA
        format (``pipeline.load_lora_weights(directory)`` on the teacher's pipeline loads it: the base weights stay
        the teacher's / init's and are not written); ``merge_lora: true`` writes the fused full Denoiser instead."""
        from distill.lora import AdapterView
        from lrm.io import write_json

        cfg = self.config
        directory = Path(directory or Path(cfg.run_dir) / "student")
        lora = None
        if isinstance(student.model, AdapterView):
            view = student.model
            if cfg.merge_lora:
                merged = copy.copy(student)
                merged._modules = dict(student._modules)
                merged._modules["model"] = view._lora.merged(view.adapter)
                merged.save_pretrained(directory, fp16=cfg.student_fp16)
            else:
                directory.mkdir(parents=True, exist_ok=True)
                view._lora.save_diffusers(view.adapter, directory, fp16=cfg.student_fp16)
                lora = {"format": "diffusers", "weights": "pytorch_lora_weights.safetensors", "rank": cfg.lora_rank,
                        "alpha": cfg.lora_alpha or cfg.lora_rank, "target_modules": list(cfg.lora_target_modules),
                        "base": "the teacher's network (lrm distill) / the init's (lrm finetune); not written here",
                        "base_path": str(cfg.teacher),
                        "denoiser": student.describe()}
        else:
            student.save_pretrained(directory, fp16=cfg.student_fp16)
        write_json(directory / "student.json", {
            "timesteps": self.timesteps, "parameterization": student.parameterization, "step": self.step,
            "consistency_function": {"sigma_data": cfg.sigma_data, "timestep_scaling": cfg.timestep_scaling},
            **({"lora": lora} if lora else {}), **meta})
        return directory


__all__ = ["ShellConfig", "StudentShell", "SHELL_MUTABLE_KEYS"]
