"""A small KL autoencoder (diffusers `AutoencoderKL`) for the shapes world, and its short training.

Pixels -> latents at 1/8 of the side with 8 channels; Harmon-Shapes groups them 2 x 2 into tokens (patch_size 2),
so a token covers 16 px, as the released KL-16's do, and one token is one cell of the world's grid. Trained with
L1 + L2 reconstruction losses (object pixels weighing more than the background) and a KL term, with the posterior's
standard deviation fixed, on freshly rendered scenes of both splits (the autoencoder sees pixels only, never
captions), then the latents' standard deviation sets the scale Harmon multiplies them by, as `vae_scale` does for
the released KL-16.
"""

import math
import random
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..modeling.image_processing_harmon import HarmonImageProcessor
from .cases import generation_cases
from .world import BACKGROUND, IMAGE_SIZE, Scene, render, sample_scene


SHAPES_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 8,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "mid_block_add_attention": False,
    "act_fn": "silu",
}
KL_WEIGHT = 1e-4
# The decoder trains on latents sampled with this fixed standard deviation (in unscaled latent units), so the encoder
# must set apart by more than this noise whatever the decoder must tell apart, while the KL term keeps the means from
# simply growing. With a learned, near-zero deviation (and KL weight 1e-6) yellow and orange tokens lay 2.17 apart and
# red and green 2.89, against 11.8 between an object and the empty cell, and the diffusion head drew exactly these
# colours for each other; with 0.25 they lie 3.67 and 4.80 apart (15.2 for an object), and a Harmon-Shapes trained on
# them draws the object it is certain of 0.935 of the time instead of 0.31 (`python benchmarks/shapes/diagnose.py`).
POSTERIOR_STD = 0.25
# The background is ~90 % of the pixels. Unweighted, training sat for a seed-dependent time at blurry objects: after
# 1200 steps 0.67 of 200 held-out reconstructions passed the detector, against 0.98 with this weight.
OBJECT_PIXEL_WEIGHT = 10.0
# After 2000 steps 0.990 of ShapesEval's 200 held-out scenes pass the detector after the round trip
# (`round_trip_score`, run 10).
VAE_STEPS = 2000


def render_pixels(scenes: list[Scene], size: int) -> torch.Tensor:
    """Scenes rendered in [-1, 1], (b, 3, size, size)."""
    return torch.from_numpy(HarmonImageProcessor.normalize(np.stack([np.asarray(render(s, size)) for s in scenes])))


def scene_batch(rng: random.Random, batch_size: int, size: int) -> torch.Tensor:
    """Freshly sampled whole scenes in [-1, 1], (b, 3, size, size)."""
    return render_pixels([sample_scene(rng) for _ in range(batch_size)], size)


def train_vae(steps: int = VAE_STEPS, batch_size: int = 8, learning_rate: float = 2e-3, size: int = IMAGE_SIZE,
              seed: int = 0, log_every: int = 50) -> tuple[AutoencoderKL, float]:
    """Train the autoencoder; returns it and the latent scale (1 / std of the latents' posterior means)."""
    torch.manual_seed(seed)
    rng = random.Random(f"shapes-vae/{seed}")
    vae = AutoencoderKL(**SHAPES_VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    background = torch.from_numpy(HarmonImageProcessor.normalize(np.array([[BACKGROUND]], dtype=np.uint8)))  # (3, 1, 1)
    start = time.time()
    for step in range(1, steps + 1):
        # Whole images, not crops: the GroupNorm statistics of a crop are not those of the image the autoencoder will
        # see. Trained on 32 px crops (4x the batch, the same pixels per step), 0.865 of 200 held-out
        # reconstructions passed the detector.
        pixels = scene_batch(rng, batch_size, size)
        means = vae.encode(pixels).latent_dist.mean
        reconstruction = vae.decode(means + POSTERIOR_STD * torch.randn_like(means)).sample
        error = reconstruction - pixels
        weight = torch.where((pixels != background).any(dim=1, keepdim=True), OBJECT_PIXEL_WEIGHT, 1.0)
        # KL to N(0, 1) with the deviation fixed: only the means' term depends on the weights.
        kl = 0.5 * means.pow(2).sum(dim=(1, 2, 3))
        loss = (weight * (error.abs() + error.pow(2))).mean() / weight.mean() + KL_WEIGHT * kl.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"vae step {step}/{steps}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        means = vae.encode(scene_batch(rng, 256, size)).latent_dist.mode()
    return vae, 1.0 / means.std().item()


@torch.no_grad()
def round_trip_score(vae: AutoencoderKL, num_scenes: int = 200, seed: int = 0, size: int = IMAGE_SIZE) -> float:
    """Share of ShapesEval's held-out scenes whose reconstruction (encode, posterior mode, decode) still passes the
    detector: the most a generator over these latents can score."""
    cases = generation_cases(num_scenes, seed=seed)
    pixels = render_pixels([case.scene for case in cases], size)
    reconstructions = HarmonImageProcessor.postprocess(vae.decode(vae.encode(pixels).latent_dist.mode()).sample)
    return float(np.mean([case.is_met_by(image) for image, case in zip(reconstructions, cases)]))
