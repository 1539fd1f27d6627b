"""Diffusion processes: noise schedules, pure-JAX samplers with a correction hook, classifier-free
guidance and the training loss/loop. See docs/samplers.md."""
from dqjax.diffusion.guidance import classifier_free_guidance
from dqjax.diffusion.samplers import (SAMPLERS, SPACINGS, SampleOutput, SamplerConfig, StepInfo, Trajectory,
                                      make_sample_fn, sample, timesteps_for)
from dqjax.diffusion.schedules import (NoiseSchedule, eps_and_x0, eps_from_output, make_schedule, q_sample,
                                       schedule_from_betas, training_target, x0_from_output)
