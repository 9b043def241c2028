"""The tiny DistillTrainer set-up shared by the trainer tests and the multi-process scripts they run under torchrun."""

import torch


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8)


def tiny_teacher(seed: int = 0):
    """A conjugate-v Denoiser over ``tiny_unet`` with weights fixed by ``seed``."""
    from distill.denoiser import Denoiser
    from lrm.schedules import DDPMSchedule

    torch.manual_seed(seed)
    return Denoiser(tiny_unet(), DDPMSchedule(), "conjugate_v")


def tiny_data(n: int = 16):
    """``n`` random 4x8x8 data latents with random 5-token, 8-dim text features (fixed seed)."""
    from distill.trainer import DistillData

    g = torch.Generator().manual_seed(1)
    return DistillData(torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 5, 8, generator=g),
                       torch.ones(n, 5, dtype=torch.bool), [f"prompt {i}" for i in range(n)])


def tiny_trainer(run_dir: str, vae, **config):
    """``(DistillTrainer, LRM head)``: ``tiny_teacher``, ``tiny_data``, a concurrent linear LRM on the decoded mean
    brightness; the same weights on every rank (fixed seeds). ``config`` overrides ``DistillConfig`` (3 steps of
    VSD + CD + L_FT, batch 2, 1 fake update by default)."""
    from distill.lrm_ft import ConcurrentLRM
    from distill.trainer import DistillConfig, DistillTrainer

    teacher = tiny_teacher()
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 1), torch.nn.Flatten(0))
    lrm = ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=1e-2),
                        lambda px, prompts: px.mean(dim=(1, 2, 3)), vae, text_conditioned=False)
    cfg = DistillConfig(**{"run_dir": run_dir, "device": "cpu", "steps": 3, "batch_size": 2, "fake_updates": 1,
                           "cd_teacher_steps": 1, "use_lrm_ft": True, "lrm_mode": "concurrent", "sample_every": 0,
                           "progress": False, "tensorboard": False, "lr_student": 1e-3, "lr_fake": 1e-3, **config})
    return DistillTrainer(cfg, teacher, tiny_data(), lrm=lrm), head
