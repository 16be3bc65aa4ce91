"""Diffusion noise, SeVa's default T(I) (paper 4.1, Fig. 6: step 800 for 7B, 500 for 13B).

The forward diffusion q(x_t | x_0) of DDPM at one step t of T = 1000: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
applied as the authors do to the processor's CLIP-normalized pixel tensor (after padding, resizing and
normalizing), not to the PIL image, with the authors' (VCD) sigmoid beta schedule or DDPM's linear one.
Each sample gets its own noise, seeded by (seed, sample id), so the noise does not depend on the batch.
The image-level augmentations of Fig. 2 are augment.py's.
"""
import numbers

import torch

import common

NUM_DIFFUSION_STEPS = 1000


def alpha_bar(schedule: str = "sigmoid") -> torch.Tensor:
    """The cumulative product of (1 - beta_t) over the 1000 steps, shape (1000,), float64."""
    if schedule == "sigmoid":  # the authors' (VCD) schedule
        steps = torch.linspace(-6, 6, NUM_DIFFUSION_STEPS, dtype=torch.float64)
        betas = torch.sigmoid(steps) * (5e-3 - 1e-5) + 1e-5
    elif schedule == "linear":  # DDPM (Ho et al. 2020), = diffusers' DDPMScheduler() default
        betas = torch.linspace(1e-4, 0.02, NUM_DIFFUSION_STEPS, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; use 'sigmoid' (authors') or 'linear' (DDPM)")
    return torch.cumprod(1 - betas, dim=0)


def diffusion_noise(pixel_values: torch.Tensor, noise_step: int, generator: torch.Generator | None = None,
                    schedule: str = "sigmoid") -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I)."""
    # x_0 is the processor's CLIP-normalized tensor, as in the authors' code; any shape works.
    if isinstance(noise_step, bool) or not isinstance(noise_step, numbers.Integral):
        raise ValueError(f"noise_step must be an int in 0..{NUM_DIFFUSION_STEPS - 1}, got {noise_step!r}")
    if not 0 <= noise_step < NUM_DIFFUSION_STEPS:
        raise ValueError(f"noise_step must be in 0..{NUM_DIFFUSION_STEPS - 1}, got {noise_step}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
    signal_fraction = alpha_bar(schedule)[noise_step]
    noise = torch.randn(pixel_values.shape, generator=generator, dtype=pixel_values.dtype,
                        device=pixel_values.device)
    return signal_fraction.sqrt().item() * pixel_values + (1 - signal_fraction).sqrt().item() * noise


def diffusion_noise_rows(pixel_values: torch.Tensor, sample_ids, noise_step: int, seed: int,
                         schedule: str = "sigmoid") -> torch.Tensor:
    """diffusion_noise on each row of a batch (B, ...), or each tensor of a list (generate.py's pixel_transform
    gets one tensor per image, vlm.image_pixels), with its own generator seeded by (seed, sample id), so a
    sample's noise does not depend on the batch it lands in."""
    if len(sample_ids) != len(pixel_values):
        raise ValueError(f"{len(sample_ids)} sample ids for {len(pixel_values)} rows")
    rows = [diffusion_noise(row, noise_step, torch.Generator(row.device).manual_seed(common.sample_seed(seed, i)), schedule)
            for row, i in zip(pixel_values, sample_ids)]
    return rows if isinstance(pixel_values, (list, tuple)) else torch.stack(rows)
