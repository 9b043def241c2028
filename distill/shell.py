"""What the student trainers (``lrm distill``'s ``DistillTrainer``, ``lrm finetune``'s ``FinetuneTrainer``) share:
the run-control keys of their configs, and which of them a resumed run may change. (The trainers' shell methods are
still two copies: issue 18 moves them here.)"""

from __future__ import annotations

from dataclasses import dataclass

from distill.builders import ModelSpec
from lrm.config import ConfigError, opt

# run-control keys a resumed run may change (how long, how often it reports; not what it trains)
SHELL_MUTABLE_KEYS = ("steps", "resume", "overwrite", "progress", "log_every", "ckpt_every", "sample_every",
                      "final_checkpoint", "student_fp16", "max_nonfinite_steps", "num_sample_prompts",
                      "samples_per_prompt", "vae_chunk_size", "device")


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")


__all__ = ["ShellConfig", "SHELL_MUTABLE_KEYS"]
