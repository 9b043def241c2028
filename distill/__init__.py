"""Distillation: denoisers with explicit parameterisations, schedules, samplers, and DOLLAR's losses."""

from distill.denoiser import Denoiser
from distill.models import load_shapes_teacher, shapes_image_unet, shapes_video_unet
from distill.parameterization import PARAMETERIZATIONS, convert, target, to_eps, to_x0, to_x0_eps
from distill.samplers import (
    STUDENT_TIMESTEPS,
    SampleTrajectory,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    step_log_prob,
    stochastic_sample,
    student_sample,
)
from lrm.schedules import DDPMSchedule, FlowSchedule, schedule_from_dict

__all__ = [
    "DDPMSchedule", "FlowSchedule", "schedule_from_dict", "PARAMETERIZATIONS", "to_x0", "to_eps", "to_x0_eps",
    "target", "convert", "Denoiser", "ddim_sample", "ddim_step", "ddim_timesteps", "student_sample",
    "stochastic_sample", "step_log_prob", "SampleTrajectory", "STUDENT_TIMESTEPS", "shapes_image_unet",
    "shapes_video_unet", "load_shapes_teacher",
]
