"""The tiny DistillTrainer set-up of the multi-process tests (imported by the scripts they run under torchrun)."""

import torch


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8)


def tiny_trainer(run_dir: str, vae, **config):
    """``(DistillTrainer, LRM head)``: a tiny conjugate-v UNet teacher, 16 random data latents, a concurrent linear
    LRM on the decoded mean brightness; the same weights on every rank (fixed seed). ``config`` overrides
    ``DistillConfig`` (3 steps of VSD + CD + L_FT, batch 2, 1 fake update by default)."""
    from distill.denoiser import Denoiser
    from distill.lrm_ft import ConcurrentLRM
    from distill.schedules import DDPMSchedule
    from distill.trainer import DistillConfig, DistillData, DistillTrainer

    torch.manual_seed(0)  # the same teacher and head init on every rank
    unet = tiny_unet()
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 1), torch.nn.Flatten(0))
    lrm = ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=1e-2),
                        lambda px, prompts: px.mean(dim=(1, 2, 3)), vae, text_conditioned=False)
    g = torch.Generator().manual_seed(1)
    data = DistillData(torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 5, 8, generator=g),
                       torch.ones(16, 5, dtype=torch.bool), [f"p{i}" for i in range(16)])
    cfg = DistillConfig(**{"run_dir": run_dir, "device": "cpu", "steps": 3, "batch_size": 2, "fake_updates": 1,
                           "cd_teacher_steps": 1, "use_lrm_ft": True, "lrm_mode": "concurrent", "sample_every": 0,
                           "progress": False, "tensorboard": False, "lr_student": 1e-3, "lr_fake": 1e-3, **config})
    return DistillTrainer(cfg, Denoiser(unet, DDPMSchedule(), "conjugate_v"), data, lrm=lrm), head
