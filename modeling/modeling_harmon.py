"""Harmon: unified image understanding and generation through one MAR encoder shared with a Qwen2.5 LLM.

Understanding: the whole image's latent tokens go through the MAR encoder; projected to the LLM width, the features
replace the `<image>` placeholders of the prompt and the LLM answers by next-token prediction.

Generation: the MAR encoder sees the latent tokens generated so far; its features pass through the LLM after the
prompt and come back as a residual; the MAR decoder turns them into one condition per token, and a small diffusion
MLP samples the still-masked tokens. K rounds of this reveal all tokens, which the VAE decodes to pixels.
"""

import contextlib
import math
import numbers
import dataclasses
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers import (AutoModel, GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (BaseModelOutputWithPast, BaseModelOutputWithPooling,
                                           CausalLMOutputWithPast, ModelOutput)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.versions import require_version

from .configuration_harmon import HarmonConfig
from .scheduling_harmon import HarmonDiffusionScheduler


# This file also runs as Hub remote code, outside the package's requirements, and before 5.24 the language model
# silently ignores the `cache` argument this code passes.
require_version("transformers>=5.24", "Harmon's modeling code needs it: pip install -U 'transformers>=5.24'")


# MAR's mask ratio in text-to-image training: a normal centred on "all masked" (its spread and lower end are in
# the config).
MASK_RATIO_MEAN = 1.0
# Pixel values farther than this outside [-1, 1] are taken for unnormalised input (e.g. 0..255).
PIXEL_RANGE_TOLERANCE = 0.5
# The release's sampling settings, the defaults of `generate_images` for a model whose generation_config names none
# (its `image_generation` entry; the diffusion steps per round come from `config.num_inference_steps` there).
RELEASE_IMAGE_GENERATION = {
    "num_iter": 64, "guidance_scale": 3.0, "guidance_schedule": "constant", "temperature": 1.0, "preset": "reference",
}
# The auto classes besides AutoModel that a folder saved with the remote code names (its config's auto_map).
REMOTE_CODE_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")
# Upper bound on the diffusion head's precomputed modulations during sampling (elements; 64 MB in float32).
MODULATION_BUFFER_ELEMENTS = 16 * 2**20
# Names of non-finite weight tensors that a load's error lists, of however many.
NONFINITE_NAMES_SHOWN = 5
# The arguments of `from_pretrained` that locate a folder's files: its generation config is read with them.
FILE_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


# ----------------------------------------------------------------------------------------------------------------
# MAR encoder and decoder
# ----------------------------------------------------------------------------------------------------------------


class HarmonMARAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, hidden_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj_dropout = nn.Dropout(hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        # (b, n, 3d) -> 3 x (b, heads, n, d / heads)
        query, key, value = (
            self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        )
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.attention_dropout if self.training else 0.0
        )
        return self.proj_dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))


class HarmonMARMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(hidden_states)))))


class HarmonMARBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block."""

    def __init__(self, config: HarmonConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attn = HarmonMARAttention(hidden_size, num_heads, config.attention_dropout, config.hidden_dropout)
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = HarmonMARMLP(hidden_size, int(hidden_size * config.mlp_ratio), config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


def resize_grid_embedding(embedding: torch.Tensor, base_grid_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a (1, base*base, d) raster-order embedding to (1, h*w, d)."""
    height, width = grid_size
    if (height, width) == (base_grid_size, base_grid_size):
        return embedding
    grid = embedding.reshape(1, base_grid_size, base_grid_size, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)


def buffered_position_embedding(
    embedding: torch.Tensor, buffer_size: int, base_grid_size: int, grid_size: tuple[int, int]
) -> torch.Tensor:
    """A (1, buffer_size + base², d) embedding for an h x w grid: the buffer part as is, the image part resized."""
    buffer_part, image_part = embedding.split([buffer_size, base_grid_size**2], dim=1)
    return torch.cat([buffer_part, resize_grid_embedding(image_part, base_grid_size, grid_size)], dim=1)


def visible_positions(mask: torch.Tensor, buffer_size: int) -> torch.Tensor:
    """(b, buffer_size + L) booleans: the buffer slots and the unmasked image tokens."""
    return torch.cat([mask.new_zeros(mask.shape[0], buffer_size), mask], dim=1) == 0


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: its first floating-point parameter's. Not a linear layer's weight dtype,
    which bitsandbytes makes int8 (or packed uint8) while the layer still takes and returns floating point."""
    return next(parameter.dtype for parameter in module.parameters() if parameter.is_floating_point())


class HarmonMARStack(nn.Module):
    """The transformer blocks and final norm shared by the MAR encoder and decoder."""

    def __init__(self, config: HarmonConfig, hidden_size: int, num_layers: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList([HarmonMARBlock(config, hidden_size, num_heads) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


class HarmonMAREncoder(nn.Module):
    """Embeds the visible latent tokens, behind `buffer_size` learned buffer slots."""

    def __init__(self, config: HarmonConfig):
        super().__init__()
        width = config.encoder_hidden_size
        self.buffer_size = config.buffer_size
        self.base_grid_size = config.base_grid_size
        self.token_proj = nn.Linear(config.token_channels, width)
        self.buffer_embedding = nn.Parameter(torch.zeros(1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.buffer_size + config.base_grid_size**2, width))
        self.token_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.stack = HarmonMARStack(
            config, width, config.encoder_num_hidden_layers, config.encoder_num_attention_heads
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid_size: tuple[int, int]) -> torch.Tensor:
        """tokens (b, h*w, c), mask (b, h*w) with 1 = masked, or None for all visible (understanding) ->
        (b, buffer_size + visible, d), buffers first.

        Every row must have the same number of masked tokens.
        """
        batch = tokens.shape[0]
        embeddings = self.token_proj(tokens.to(compute_dtype(self)))
        buffers = self.buffer_embedding.expand(batch, self.buffer_size, -1)
        position = buffered_position_embedding(self.pos_embed, self.buffer_size, self.base_grid_size, grid_size)
        embeddings = self.token_norm(torch.cat([buffers, embeddings], dim=1) + position)
        if mask is not None:  # a data-dependent selection; with every token visible there is none to make
            embeddings = embeddings[visible_positions(mask, self.buffer_size)].reshape(batch, -1, embeddings.shape[-1])
        return self.stack(embeddings)


class HarmonMARDecoder(nn.Module):
    """Fills the masked positions with a learned token and gives one condition vector per image token."""

    def __init__(self, config: HarmonConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.buffer_size = config.buffer_size
        self.base_grid_size = config.base_grid_size
        self.embed = nn.Linear(config.encoder_hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.buffer_size + config.base_grid_size**2, width))
        self.stack = HarmonMARStack(
            config, width, config.decoder_num_hidden_layers, config.decoder_num_attention_heads
        )
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, config.base_grid_size**2, width))

    def forward(self, encoded: torch.Tensor, mask: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """encoded (b, buffer_size + visible, d_enc), mask (b, h*w) -> conditions (b, h*w, d_dec)."""
        batch, length = mask.shape
        embedded = self.embed(encoded)
        full = self.mask_token.to(embedded.dtype).expand(batch, self.buffer_size + length, -1).clone()
        full[visible_positions(mask, self.buffer_size)] = embedded.reshape(-1, embedded.shape[-1])
        full = full + buffered_position_embedding(self.pos_embed, self.buffer_size, self.base_grid_size, grid_size)
        hidden_states = self.stack(full)[:, self.buffer_size :]
        return hidden_states + resize_grid_embedding(self.diffusion_pos_embed, self.base_grid_size, grid_size)


# ----------------------------------------------------------------------------------------------------------------
# Diffusion head
# ----------------------------------------------------------------------------------------------------------------


def takes_learned_variance(scheduler) -> bool:
    """Whether `scheduler` steps with the head's variance values too ([`HarmonDiffusionScheduler`], from any copy
    of its file), or with the prediction alone (diffusers' schedulers)."""
    return getattr(scheduler, "takes_learned_variance", False)


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return hidden_states * (1 + scale) + shift


class HarmonDiffusionResBlock(GradientCheckpointingLayer):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.modulation = nn.Linear(width, 3 * width)

    def forward(self, hidden_states: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """modulation: this block's `self.modulation(SiLU(conditioning))`, (n, 3 * width)."""
        shift, scale, gate = modulation.chunk(3, dim=-1)
        update = self.fc2(F.silu(self.fc1(modulate(self.norm(hidden_states), shift, scale))))
        return hidden_states + gate * update


class HarmonDiffusionFinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_channels)

    def forward(self, hidden_states: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(modulate(self.norm(hidden_states), shift, scale))


class HarmonDiffusionHead(nn.Module):
    """MAR's per-token denoiser (an MLP with adaptive LayerNorm): for each noisy token, predicts epsilon (or v, see
    `diffusion_prediction_type`) and the value that sets its variance between the posterior's and beta.

    Like MAR's `DiffLoss`, it owns its diffusion process (`noise_scheduler`), its training loss (`loss`) and its
    sampler (`sample`). The adaptive-norm modulations depend on the timestep and the condition only, not on the
    noisy token, so the sampler computes them for many steps in one batch (`modulations`) and runs only `denoise`
    per step.
    """

    def __init__(self, config: HarmonConfig):
        super().__init__()
        width = config.diffusion_head_hidden_size
        self.token_channels = config.token_channels
        # Not a module: its float64 tables stay on the CPU even when the weights are created on the meta device.
        with torch.device("cpu"):
            self.noise_scheduler = HarmonDiffusionScheduler(
                num_train_timesteps=config.num_train_timesteps,
                prediction_type=config.diffusion_prediction_type,
                clip_sample=config.diffusion_clip_range is not None,
                clip_sample_range=config.diffusion_clip_range or 1.0,
            )
        self.input_proj = nn.Linear(config.token_channels, width)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, width)
        self.cond_embed = nn.Linear(config.decoder_hidden_size, width)
        self.res_blocks = nn.ModuleList(
            [HarmonDiffusionResBlock(width) for _ in range(config.diffusion_head_num_layers)]
        )
        self.final_layer = HarmonDiffusionFinalLayer(width, 2 * config.token_channels)

    @property
    def modulation_width(self) -> int:
        return sum(block.modulation.out_features for block in self.res_blocks) + self.final_layer.modulation.out_features

    def embed_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps (...) of the original process -> (..., width)."""
        return self.time_embed(self.time_proj(timesteps.flatten()).to(compute_dtype(self))).reshape(
            *timesteps.shape, -1
        )

    def embed_conditions(self, condition: torch.Tensor) -> torch.Tensor:
        return self.cond_embed(condition.to(compute_dtype(self)))

    def modulations(self, conditioning: torch.Tensor) -> list[torch.Tensor]:
        """conditioning (..., width) = time + condition embedding -> one modulation tensor per block and the final layer."""
        activated = F.silu(conditioning)
        return [block.modulation(activated) for block in self.res_blocks] + [self.final_layer.modulation(activated)]

    def denoise(self, noisy: torch.Tensor, modulations: list[torch.Tensor]) -> torch.Tensor:
        """noisy (n, c) -> (n, 2c) under precomputed modulations (each (n, k * width))."""
        hidden_states = self.input_proj(noisy.to(compute_dtype(self)))
        for block, modulation in zip(self.res_blocks, modulations):
            hidden_states = block(hidden_states, modulation)
        return self.final_layer(hidden_states, modulations[-1])

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """noisy (n, c), timesteps (n,) of the original process, condition (n, d_dec) -> (n, 2c)."""
        conditioning = self.embed_timesteps(timesteps) + self.embed_conditions(condition)
        return self.denoise(noisy, self.modulations(conditioning))

    def denoise_with_guidance(self, noisy, modulations, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance over a batch of conditional rows then unconditional rows.

        Both halves are evaluated on the conditional half's tokens; the guided prediction (epsilon or v, both linear
        in the clean latent for a given noisy token) is used for both halves while each keeps its own variance.
        """
        if guidance_scale == 1.0:
            return self.denoise(noisy, modulations)
        conditional = noisy[: len(noisy) // 2]
        output = self.denoise(torch.cat([conditional, conditional]), modulations)
        prediction, variance_value = output.split(self.token_channels, dim=-1)
        prediction_cond, prediction_uncond = prediction.chunk(2)
        guided = prediction_uncond + guidance_scale * (prediction_cond - prediction_uncond)
        return torch.cat([torch.cat([guided, guided]), variance_value], dim=-1)

    def forward_with_guidance(self, noisy, timesteps, condition, guidance_scale: float) -> torch.Tensor:
        conditioning = self.embed_timesteps(timesteps) + self.embed_conditions(condition)
        return self.denoise_with_guidance(noisy, self.modulations(conditioning), guidance_scale)

    def make_sampling_scheduler(self, num_inference_steps: int) -> HarmonDiffusionScheduler:
        """The reference sampler: the head's own process, respaced to `num_inference_steps`."""
        with torch.device("cpu"):
            scheduler = HarmonDiffusionScheduler.from_config(self.noise_scheduler.config)
            scheduler.set_timesteps(num_inference_steps)
        return scheduler

    def check_scheduler(self, scheduler):
        """Refuse a scheduler that cannot drive this head: another prediction type, or (a scheduler other than
        [`HarmonDiffusionScheduler`]) a learned variance it would cut the head's output for."""
        config = scheduler.config
        if not takes_learned_variance(scheduler) and config.get("variance_type") in ("learned", "learned_range"):
            raise ValueError(
                f"{type(scheduler).__name__} would cut the head's output to 3 channels for its learned variance; "
                "create it with variance_type=None, e.g. DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, "
                "variance_type=None)"
            )
        head_predicts = self.noise_scheduler.config.prediction_type
        if config.get("prediction_type", head_predicts) != head_predicts:
            raise ValueError(
                f"{type(scheduler).__name__} has prediction_type={config.prediction_type!r}, but the model's "
                f"diffusion head predicts {head_predicts!r}; create the scheduler from pipe.scheduler.config"
            )

    def loss(self, target, conditions, timesteps, noise) -> dict[str, torch.Tensor]:
        """Per-token `mse`, `vb` (bits, mean prediction detached) and `loss` = mse + vb, for target tokens (n, c)
        noised with `noise` (n, c) to `timesteps` (n,) of the training process, under conditions (n, d_dec)."""
        noisy = self.noise_scheduler.add_noise(target, noise, timesteps)
        prediction, variance_value = self(noisy, timesteps, conditions).float().split(self.token_channels, dim=-1)
        prediction_target = self.noise_scheduler.training_target(target, noise, timesteps)
        mse = ((prediction_target - prediction) ** 2).mean(dim=-1)
        vb = self.noise_scheduler.variational_bound(
            torch.cat([prediction.detach(), variance_value], dim=-1), target, noisy, timesteps
        )
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    @torch.no_grad()
    def sample(
        self,
        conditions: torch.Tensor,
        scheduler,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Sample one latent token per condition row (n, d_dec) -> (n, c) in float32, in `num_inference_steps`
        (default: as many as the scheduler was last set to).

        `scheduler` is a [`HarmonDiffusionScheduler`] (`make_sampling_scheduler`: the reference's process) or any
        diffusers scheduler with the head's `prediction_type`, which gets the prediction alone (for example
        DPM-Solver++ for fewer steps; `temperature` applies to the Harmon scheduler only). With guidance,
        `conditions` holds conditional rows then unconditional rows, and both halves start from the same noise:
        `latents` (n/2, c), else drawn.
        """
        # Every call samples a fresh set of tokens: restart the scheduler (multistep solvers keep a history).
        scheduler.set_timesteps(num_inference_steps or scheduler.num_inference_steps)
        learned_variance = takes_learned_variance(scheduler)
        num_rows = conditions.shape[0]
        num_independent = num_rows // 2 if guidance_scale != 1.0 else num_rows
        if latents is None:
            latents = torch.randn(
                (num_independent, self.token_channels), generator=generator, dtype=torch.float32
            ).to(conditions.device)
        sample = latents.float().repeat(num_rows // num_independent, 1)
        if not learned_variance:
            sample = sample * scheduler.init_noise_sigma

        condition_embedding = self.embed_conditions(conditions)  # computed once for all steps
        timesteps = scheduler.timesteps
        # Modulations of a chunk of steps in one batch: one pass over those weights instead of one per step.
        steps_per_chunk = max(1, MODULATION_BUFFER_ELEMENTS // (num_rows * self.modulation_width))
        for chunk_start in range(0, len(timesteps), steps_per_chunk):
            chunk = timesteps[chunk_start : chunk_start + steps_per_chunk]
            time_embedding = self.embed_timesteps(chunk.to(conditions.device))  # (steps, width)
            modulations = self.modulations(time_embedding[:, None] + condition_embedding[None])  # (steps, n, k*width)
            for offset, timestep in enumerate(chunk):
                model_input = sample if learned_variance else scheduler.scale_model_input(sample, timestep)
                model_output = self.denoise_with_guidance(
                    model_input, [modulation[offset] for modulation in modulations], guidance_scale
                ).float()
                if learned_variance:
                    step = scheduler.step(model_output, timestep, sample, generator=generator, temperature=temperature)
                else:
                    step = scheduler.step(model_output[:, : self.token_channels], timestep, sample, generator=generator)
                sample = step.prev_sample
        return sample


class HarmonProjector(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.linear_2 = nn.Linear(hidden_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(hidden_states)))


# ----------------------------------------------------------------------------------------------------------------
# Sampling helpers
# ----------------------------------------------------------------------------------------------------------------


def num_masked_after_round(round_index: int, num_rounds: int, num_tokens: int, num_masked_now: int) -> int:
    """Tokens still masked after round `round_index` (cosine schedule), always leaving one to the last round."""
    if round_index >= num_rounds - 1:
        return 0
    scheduled = math.floor(num_tokens * math.cos(math.pi / 2.0 * (round_index + 1) / num_rounds))
    return int(max(1, min(num_masked_now - 1, scheduled)))


GUIDANCE_SCHEDULES = ("constant", "linear")


def guidance_scale_at(guidance_scale: float, schedule: str, num_masked_next: int, num_tokens: int) -> float:
    """The round's guidance: constant, or growing linearly with the share of tokens generated (Muse)."""
    if schedule == "linear":
        return 1.0 + (guidance_scale - 1.0) * (num_tokens - num_masked_next) / num_tokens
    return guidance_scale


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling_settings(**settings):
    """Refuse image generation settings, given by name (those of `RELEASE_IMAGE_GENERATION` and
    num_inference_steps), outside the sampler's rules; each message names the setting and the value."""
    for name, value in settings.items():
        if name in ("num_iter", "num_inference_steps"):
            if not _is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        elif name == "guidance_scale":
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"guidance_scale must be a finite number, got {value!r}")
        elif name == "temperature":
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"temperature must be a finite number >= 0, got {value!r}")
        elif name == "guidance_schedule":
            if value not in GUIDANCE_SCHEDULES:
                raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {value!r}")
        elif name == "preset":
            sampling_preset(value)
        else:
            raise ValueError(f"unknown image generation setting {name!r}: the settings are "
                             f"{sorted([*RELEASE_IMAGE_GENERATION, 'num_inference_steps'])}")


def check_generator(generator):
    """`generate_images`' randomness: None, a torch.Generator, or a list of them (one per image)."""
    for one in generator if isinstance(generator, list) else [generator]:
        if generator is not None and not isinstance(one, torch.Generator):
            where = " in the list" if isinstance(generator, list) else ""
            raise ValueError(f"generator must be a torch.Generator or a list of them (one per image), "
                             f"got {one!r}{where}")


def check_generation_config(generation_config: GenerationConfig):
    """Refuse a generation config whose numbers break generation: NaN or inf anywhere (a NaN guidance_scale makes
    every answer '!!!!'), or `image_generation` defaults outside the sampler's rules."""
    for name, value in generation_config.to_dict().items():
        if _is_real(value) and not math.isfinite(value):
            raise ValueError(f"the generation config's {name} must be a finite number, got {value!r}")
    saved = getattr(generation_config, "image_generation", None) or {}
    if not isinstance(saved, dict):
        raise ValueError(f"the generation config's image_generation must map settings to values, got {saved!r}")
    try:
        check_sampling_settings(**saved)
    except ValueError as error:
        raise ValueError(f"the generation config's image_generation: {error}") from None


def saved_generation_config(source, from_pretrained_kwargs: dict) -> GenerationConfig | None:
    """The generation config that `from_pretrained(source, **from_pretrained_kwargs)` will load, or None where the
    folder or Hub repository has none."""
    if source is None or from_pretrained_kwargs.get("generation_config") is not None:
        return from_pretrained_kwargs.get("generation_config")
    location = {name: from_pretrained_kwargs[name] for name in FILE_ARGUMENTS if name in from_pretrained_kwargs}
    try:
        return GenerationConfig.from_pretrained(source, **location)
    except OSError:  # no generation_config.json: the model's defaults, which are valid
        return None


def nonfinite_tensors(named_tensors) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf. Each is summed in float32 first, one pass
    without a copy (60 times faster than `isfinite().all()`); a sum can go non-finite by overflow alone, so only
    then are its elements checked. Tensor subclasses (quantized or sharded weights) and offloaded (meta) tensors
    are left out."""
    names = []
    for name, tensor in named_tensors:
        data = tensor.data
        if type(data) is not torch.Tensor or not data.is_floating_point() or data.is_meta:
            continue
        if not torch.isfinite(data.sum(dtype=torch.float32)) and not torch.isfinite(data).all():
            names.append(name)
    return names


def refuse_nonfinite_image(tensor: torch.Tensor, what: str):
    """Raise where `tensor` holds NaN or inf: the image it would make is black, with no word of why."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"image generation produced NaN or inf {what}: the model's weights hold non-finite values "
                         "or overflow in its dtype (in float16: load it in bfloat16 or float32)")


class HarmonNonFiniteLogitsCheck(LogitsProcessor):
    """Raises where a step's scores hold NaN or +inf (-inf is how other processors rule tokens out): greedy
    decoding would otherwise pick token 0 at every step and answer '!!!!'."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if not (scores < math.inf).all():  # false for NaN and +inf alone
            raise ValueError("text generation produced NaN or inf logits: the model's weights hold non-finite values "
                             "or overflow in its dtype (in float16: load it in bfloat16 or float32)")
        return scores


@dataclass(frozen=True)
class HarmonSamplingPreset:
    """How much of the reference sampler's compute to spend: each field is one training-free technique, so that each
    can be switched on alone (`HarmonSamplingPreset(bfloat16=True)`); `SAMPLING_PRESETS` names combinations. The
    defaults are the reference sampler, bit for bit.

    Args:
        bfloat16: run the networks under bfloat16 autocast where the hardware computes in bfloat16 (CUDA GPUs that
            support it, CPUs with AVX512-BF16 or AMX), float32 elsewhere. The sampler's arithmetic stays float32.
        round_fraction: run ceil(fraction * R) rounds instead of `num_iter`, R = min(num_iter, tokens to generate)
            (the rounds that reveal something).
        first_round_steps: diffusion steps of the first round, as a fraction of `num_inference_steps`.
        last_round_steps: diffusion steps of the last round; the steps fall linearly over the rounds from the
            first's to these (DiSA, arXiv 2505.20297: later tokens, conditioned on most of the image, need fewer).
            None: every round takes the first round's steps.
        guidance_refresh: the unconditional prompts go through the LLM and the MAR decoder every `guidance_refresh`
            rounds; in the rounds between, the unconditional conditions are the conditional ones minus their
            difference in the last refreshed round (LazyMAR's condition cache, ICCV 2025). 1: every round.
    """

    bfloat16: bool = False
    round_fraction: float = 1.0
    first_round_steps: float = 1.0
    last_round_steps: int | None = None
    guidance_refresh: int = 1

    def __post_init__(self):
        if not isinstance(self.bfloat16, bool):
            raise ValueError(f"bfloat16 must be True or False, got {self.bfloat16!r}")
        for name in ("round_fraction", "first_round_steps"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
        if self.last_round_steps is not None and (not _is_integer(self.last_round_steps) or self.last_round_steps < 1):
            raise ValueError(f"last_round_steps must be a positive integer or None, got {self.last_round_steps!r}")
        if not _is_integer(self.guidance_refresh) or self.guidance_refresh < 1:
            raise ValueError(f"guidance_refresh must be a positive integer, got {self.guidance_refresh!r}")

    def num_rounds(self, num_iter: int, num_to_generate: int) -> int:
        """Rounds to run for `num_iter` requested rounds and `num_to_generate` tokens per image."""
        if self.round_fraction == 1:
            return num_iter
        return max(1, math.ceil(self.round_fraction * min(num_iter, num_to_generate)))

    def diffusion_steps(self, round_index: int, num_rounds: int, num_inference_steps: int) -> int:
        """Diffusion steps of round `round_index` of `num_rounds`."""
        first = max(1, math.ceil(self.first_round_steps * num_inference_steps))
        if self.last_round_steps is None or num_rounds == 1:
            return first
        last = min(first, self.last_round_steps)
        return last + (first - last) * (num_rounds - 1 - round_index) // (num_rounds - 1)

    def refreshes_guidance(self, round_index: int) -> bool:
        return round_index % self.guidance_refresh == 0

    def numerics(self, device: torch.device):
        """The context to run the networks in: bfloat16 autocast where asked for and native, else float32 as is."""
        if self.bfloat16 and computes_bfloat16_natively(device):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


# Measured on Harmon-Shapes and timed on the 0.5B configuration: see the README's "Sampling presets".
SAMPLING_PRESETS = {
    "reference": HarmonSamplingPreset(),
    "fast": HarmonSamplingPreset(
        bfloat16=True, round_fraction=0.5, first_round_steps=0.5, last_round_steps=5, guidance_refresh=2
    ),
    "fastest": HarmonSamplingPreset(
        bfloat16=True, round_fraction=0.25, first_round_steps=0.5, last_round_steps=5, guidance_refresh=2
    ),
}


def sampling_preset(preset) -> HarmonSamplingPreset:
    """A preset given by name (`SAMPLING_PRESETS`), as a dict of `HarmonSamplingPreset` fields (how a
    generation_config may hold one), or as a `HarmonSamplingPreset`."""
    if isinstance(preset, HarmonSamplingPreset):
        return preset
    if dataclasses.is_dataclass(preset) and type(preset).__name__ == HarmonSamplingPreset.__name__:
        preset = dataclasses.asdict(preset)  # the same class from another copy of this file (Hub remote code)
    if isinstance(preset, str):
        if preset not in SAMPLING_PRESETS:
            raise ValueError(f"preset must be one of {sorted(SAMPLING_PRESETS)} or a HarmonSamplingPreset, got {preset!r}")
        return SAMPLING_PRESETS[preset]
    if isinstance(preset, dict):
        unknown = set(preset) - {field.name for field in fields(HarmonSamplingPreset)}
        if unknown:
            raise ValueError(f"unknown sampling preset fields {sorted(unknown)}: see HarmonSamplingPreset")
        return HarmonSamplingPreset(**preset)
    raise ValueError(f"preset must be a name, a dict or a HarmonSamplingPreset, got {type(preset).__name__}")


def computes_bfloat16_natively(device: torch.device) -> bool:
    """Whether `device` has bfloat16 arithmetic units (elsewhere bfloat16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by `scale` in the backward pass."""
    detached = tensor.detach()
    return detached + scale * (tensor - detached)


@dataclass
class HarmonTrainingOutput(ModelOutput):
    """`loss`: the weighted sum of `task_losses`, one per task of the batch."""

    loss: torch.Tensor | None = None
    task_losses: dict[str, torch.Tensor] | None = None


@dataclass
class HarmonGenerationState:
    """Where a masked-autoregressive generation stands between rounds (inside `generate_images`)."""

    prompt_cache: DynamicCache  # keys and values of the prompts, conditional rows then unconditional
    prompt_attention_mask: torch.Tensor  # (rows, prompt_length)
    grid_size: tuple[int, int]  # latent tokens per side (h, w)
    tokens: torch.Tensor  # (b, h*w, c) generated or given tokens, zeros where still masked
    mask: torch.Tensor  # (b, h*w) 1 = still to generate
    orders: torch.Tensor  # (b, h*w) generation order of each image, masked positions first
    noise: torch.Tensor | None  # (b, h*w, c) every token's starting noise, when the caller fixes it
    # Guidance reuse (HarmonSamplingPreset.guidance_refresh > 1): the conditional prompts alone, and the conditional
    # minus unconditional conditions (b, h*w, d_dec) of the last round that ran both.
    conditional_prompt_cache: DynamicCache | None = None
    guidance_difference: torch.Tensor | None = None

    @property
    def latents(self) -> torch.Tensor:
        """(b, h, w, c)"""
        return self.tokens.reshape(self.tokens.shape[0], *self.grid_size, -1)


@dataclass
class HarmonRoundOutput:
    """One masked-autoregressive round: encoder features after the LLM residual, and per-token conditions."""

    encoded: torch.Tensor  # (b, buffer_size + visible, d_enc)
    conditions: torch.Tensor  # (b, h*w, d_dec)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class HarmonPreTrainedModel(PreTrainedModel):
    config: HarmonConfig
    config_class = HarmonConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "HarmonMARBlock", "HarmonDiffusionHead", "HarmonProjector"]
    # Loaded in float16, the VAE stays float32 (bfloat16 has float32's range: there it does not). Its activations are
    # the model's largest and grow with the latents it decodes, the sampler's float32 tokens divided by `vae_scale`,
    # which nothing bounds: the golden tiny model's random weights sample tokens that decode to NaN in float16, to
    # finite pixels in float32. Quantizers (bitsandbytes, torchao, ...) leave these modules unquantized too. They
    # match a name from the start of a module's path, the float16 load anywhere in it: hence the VAE's path in both
    # HarmonModel and HarmonForConditionalGeneration.
    _keep_in_fp32_modules = ["vae", "model.vae"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_compile_fullgraph = True  # generate's decoding steps with a static cache trace as one graph

    @classmethod
    def from_pretrained(cls, *args, allow_nonfinite_weights: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing weights that hold NaN or inf (from a diverged run, a bad merge
        or a corrupt copy) unless `allow_nonfinite_weights=True`."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded
        if not allow_nonfinite_weights:
            model.check_finite_weights()
        return loaded

    def check_finite_weights(self):
        """Raise where a weight holds NaN or inf: such a model generates black images and answers '!!!!'."""
        names = nonfinite_tensors(self.named_parameters())
        if names:
            shown = ", ".join(names[:NONFINITE_NAMES_SHOWN]) + (", ..." if len(names) > NONFINITE_NAMES_SHOWN else "")
            raise ValueError(f"{len(names)} weight tensor(s) hold NaN or inf values ({shown}): they would generate "
                             "black images and '!!!!' answers; pass allow_nonfinite_weights=True to from_pretrained "
                             "to load them anyway")

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips modules without parameters of their own in remote code, in case their init writes
        # tensors in place; every init here goes through `transformers.initialization`, which leaves loaded tensors
        # alone, and the containers below must run after their children.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module):
        """MAR's initialisation for the modules that come from MAR (Xavier-uniform linear layers, N(0, 0.02) learned
        embeddings and timestep MLP, zero adaptive-norm modulation and head output), PyTorch's default for the
        projections (plain `nn.Linear` layers in the reference), the LLM's own elsewhere. It only matters when
        training from scratch: the released weights replace all of it."""
        super()._init_weights(module)
        # Modules are initialised children first, so a container's choices below override its children's defaults.
        if isinstance(module, HarmonMARBlock):
            for linear in (module.attn.qkv, module.attn.proj, module.mlp.fc1, module.mlp.fc2):
                xavier_uniform_linear(linear)
        elif isinstance(module, (HarmonMAREncoder, HarmonMARDecoder)):
            for parameter in module.parameters(recurse=False):
                init.normal_(parameter, std=0.02)
            xavier_uniform_linear(module.token_proj if isinstance(module, HarmonMAREncoder) else module.embed)
        elif isinstance(module, HarmonProjector):
            # transformers' N(0, 0.02) shrinks a narrow layer's input (x0.28 at width 192, against x0.58 here): in 400
            # steps of training a small Harmon from scratch, the decoder's conditions then varied 0.1 % across prompts,
            # against 2.4 % with unit-gain projections.
            for linear in (module.linear_1, module.linear_2):
                torch_default_linear(linear)
        elif isinstance(module, HarmonDiffusionResBlock):
            xavier_uniform_linear(module.fc1)
            xavier_uniform_linear(module.fc2)
            init.zeros_(module.modulation.weight)
            init.zeros_(module.modulation.bias)
        elif isinstance(module, HarmonDiffusionFinalLayer):
            for linear in (module.modulation, module.linear):
                init.zeros_(linear.weight)
                init.zeros_(linear.bias)
        elif isinstance(module, HarmonDiffusionHead):
            xavier_uniform_linear(module.input_proj)
            xavier_uniform_linear(module.cond_embed)
            for linear in (module.time_embed.linear_1, module.time_embed.linear_2):
                init.normal_(linear.weight, std=0.02)
                init.zeros_(linear.bias)


def xavier_uniform_linear(linear: nn.Linear):
    init.xavier_uniform_(linear.weight)
    init.zeros_(linear.bias)


def torch_default_linear(linear: nn.Linear):
    """`nn.Linear.reset_parameters`, through `transformers.initialization`: U(+-1/sqrt(fan_in)) weights and bias."""
    bound = 1 / math.sqrt(linear.in_features)
    init.uniform_(linear.weight, -bound, bound)
    init.uniform_(linear.bias, -bound, bound)


class HarmonModel(HarmonPreTrainedModel):
    """Everything but the LM head: LLM, MAR encoder/decoder, diffusion head, projections and the frozen VAE."""

    def __init__(self, config: HarmonConfig):
        super().__init__(config)
        llm_width = config.text_config.hidden_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.mar_encoder = HarmonMAREncoder(config)
        self.mar_decoder = HarmonMARDecoder(config)
        self.diffusion_head = HarmonDiffusionHead(config)
        self.proj_in = HarmonProjector(config.encoder_hidden_size, llm_width, llm_width)
        self.proj_out = HarmonProjector(llm_width, config.encoder_hidden_size, llm_width)
        self.vae = AutoencoderKL.from_config({**config.vae_config, "scaling_factor": config.vae_scale})
        self.vae.requires_grad_(False)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def check_positions(self, num_positions: int, what: str):
        """Refuse `num_positions` beyond the LLM's positions: past them RoPE runs on without an error, but the
        outputs are garbage, and attention's memory grows with the square of the length."""
        limit = self.config.text_config.max_position_embeddings
        if num_positions > limit:
            raise ValueError(
                f"{what} needs {num_positions} positions, more than the LLM's {limit} (max_position_embeddings)"
            )

    # -- pixels and latents -------------------------------------------------------------------------------------

    def check_pixel_values(self, pixel_values: torch.Tensor):
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        stride = self.config.vae_stride
        if height % stride or width % stride:
            raise ValueError(f"image sides must be multiples of {stride}, got {height}x{width}")
        # Checks of the data run eagerly only: traced, they would break torch.compile's graph and torch.export.
        if not torch.compiler.is_compiling() and not (pixel_values.abs() <= 1 + PIXEL_RANGE_TOLERANCE).all():
            raise ValueError(
                f"pixel_values must be normalised to [-1, 1] (x / 255 * 2 - 1), got values in "
                f"[{pixel_values.min().item():.3g}, {pixel_values.max().item():.3g}]"
            )

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (b, 3, H, W) in [-1, 1] -> scaled latent tokens (b, H/16, W/16, c): the posterior's mode
        (16 = vae_stride, c = token_channels)."""
        self.check_pixel_values(pixel_values)
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        latents = posterior.mode() * self.config.vae_scale  # (b, c_vae, p*h, p*w)
        patch = self.config.patch_size
        if patch == 1:  # the released models: keep the view; a copied layout changed the VAE kernels' last bits
            return latents.permute(0, 2, 3, 1)
        batch, channels, height, width = latents.shape
        patches = latents.reshape(batch, channels, height // patch, patch, width // patch, patch)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, height // patch, width // patch, -1)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latent tokens (b, h, w, c) -> pixels (b, 3, 16h, 16w), nominally in [-1, 1] (not clamped)."""
        batch, height, width, _ = latents.shape
        patch = self.config.patch_size
        if patch == 1:
            latents = latents.permute(0, 3, 1, 2)
        else:
            patches = latents.reshape(batch, height, width, -1, patch, patch).permute(0, 3, 1, 4, 2, 5)
            latents = patches.reshape(batch, -1, height * patch, width * patch)
        return self.vae.decode((latents / self.config.vae_scale).to(self.vae.dtype)).sample

    # -- understanding ------------------------------------------------------------------------------------------

    def encode_visible_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid_size: tuple[int, int]):
        """MAR encoder on the visible tokens (mask None: all) -> (encoder features (b, buffer + visible, d_enc),
        LLM inputs (b, visible + buffer, d_llm): projected, image tokens first and buffers last)."""
        encoded = self.mar_encoder(tokens, mask, grid_size)
        projected = self.proj_in(encoded)
        buffer_size = self.config.buffer_size
        return encoded, torch.cat([projected[:, buffer_size:], projected[:, :buffer_size]], dim=1)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """pixel_values (b, 3, H, W) -> `pooler_output`: the features (b, (H/16)*(W/16) + buffer_size, d_llm) that
        take the placeholders' place; `last_hidden_state`: the MAR encoder's output they are projected from
        (b, buffer_size + (H/16)*(W/16), d_enc)."""
        return self.latent_image_features(self.encode_images(pixel_values))

    def latent_image_features(self, latents: torch.Tensor) -> BaseModelOutputWithPooling:
        """`get_image_features` of images already encoded to latent tokens (b, h, w, c)."""
        batch, height, width, channels = latents.shape
        tokens = latents.reshape(batch, height * width, channels)
        encoded, features = self.encode_visible_tokens(tokens, None, (height, width))
        return BaseModelOutputWithPooling(last_hidden_state=encoded, pooler_output=features)

    def get_placeholder_mask(self, input_ids, inputs_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(b, L, 1), True at the image placeholders: the `image_token_id`s of `input_ids`, or, given embeddings
        alone, the positions that hold that token's embedding. Their number must match the features (b', n, d)."""
        if input_ids is None:
            image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            placeholders = (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)
        else:
            placeholders = input_ids == self.config.image_token_id
        num_features = features.shape[0] * features.shape[1]
        if not torch.compiler.is_compiling() and placeholders.sum() != num_features:  # eagerly: see check_pixel_values
            raise ValueError(
                f"The prompt has {int(placeholders.sum())} image placeholder tokens (id {self.config.image_token_id}) "
                f"but {features.shape[0]} image(s) give {num_features} features ({features.shape[1]} per image): the "
                "two must be equal"
            )
        return placeholders.unsqueeze(-1)

    def place_image_features(self, input_ids, inputs_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """inputs_embeds (b, L, d_llm) with the image placeholders replaced, in order, by `features` (b', n, d_llm),
        whose gradient is scaled by `config.visual_gradient_scale` (the understanding features train the MAR encoder
        gently, as in the reference)."""
        placeholders = self.get_placeholder_mask(input_ids, inputs_embeds, features)
        features = scale_gradient(features, self.config.visual_gradient_scale).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(placeholders, features)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if not torch.compiler.is_compiling():  # a static cache's length is data: checked eagerly only
            sequence_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            self.check_positions((cache.get_seq_length() if cache is not None else 0) + sequence_length,
                                 "the sequence")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.get_image_features(pixel_values).pooler_output  # (b, n, d_llm)
            inputs_embeds = self.place_image_features(input_ids, inputs_embeds, features)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )

    # -- generation -----------------------------------------------------------------------------------------------

    def prefill_prompt(self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor,
                       inputs_embeds: torch.Tensor | None = None) -> DynamicCache:
        """Keys and values of the (right-padded) prompts (b, L), or of their input embeddings (b, L, d_llm),
        reused by every round."""
        cache = DynamicCache(config=self.config.text_config)
        self.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            cache=cache, use_cache=True)
        return cache

    def run_round(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        grid_size: tuple[int, int],
        prompt_cache: DynamicCache,
        prompt_attention_mask: torch.Tensor,
        prompt_inputs_embeds: torch.Tensor | None = None,
    ) -> HarmonRoundOutput:
        """One round: encode the visible tokens, pass them through the LLM after the prompt, decode conditions.

        tokens (b, h*w, c) and mask (b, h*w) describe each image once; the prompt batch may hold several prompts per
        image (conditional rows first, then unconditional), so the encoder's output is computed once and repeated.
        With `prompt_inputs_embeds` the prompt goes through the LLM in the same pass (training) instead of coming
        from `prompt_cache`, which is left as it was.
        """
        encoded, llm_inputs = self.encode_visible_tokens(tokens, mask, grid_size)
        prompts_per_image = prompt_attention_mask.shape[0] // tokens.shape[0]
        encoded = encoded.repeat(prompts_per_image, 1, 1)
        llm_inputs = llm_inputs.repeat(prompts_per_image, 1, 1)
        mask = mask.repeat(prompts_per_image, 1)

        num_image_positions = llm_inputs.shape[1]
        attention_mask = torch.cat(
            [prompt_attention_mask, prompt_attention_mask.new_ones(prompt_attention_mask.shape[0], num_image_positions)],
            dim=1,
        )
        # Pad slots of the prompt do not advance the positions of the image tokens.
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if prompt_inputs_embeds is None:
            hidden = self.language_model(
                inputs_embeds=llm_inputs.to(self.language_model.dtype),
                attention_mask=attention_mask,
                position_ids=position_ids[:, -num_image_positions:],
                cache=prompt_cache,
                use_cache=True,
            ).last_hidden_state
            prompt_cache.crop(-num_image_positions)  # back to the prompt alone
        else:
            hidden = self.language_model(
                inputs_embeds=torch.cat([prompt_inputs_embeds, llm_inputs.to(prompt_inputs_embeds.dtype)], dim=1),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state[:, -num_image_positions:]
        buffer_size = self.config.buffer_size
        hidden = torch.cat([hidden[:, -buffer_size:], hidden[:, :-buffer_size]], dim=1)  # buffers back to the front
        encoded = encoded + self.proj_out(hidden).to(encoded.dtype)
        return HarmonRoundOutput(encoded=encoded, conditions=self.mar_decoder(encoded, mask, grid_size))

    def random_mask(self, batch: int, num_tokens: int, generator=None, device=None) -> torch.Tensor:
        """MAR's training mask: a random order per image, ceil(L * r) first positions masked, r ~ truncated normal."""
        ratio = torch.empty(1)
        torch.nn.init.trunc_normal_(
            ratio,
            mean=MASK_RATIO_MEAN,
            std=self.config.mask_ratio_std,
            a=self.config.mask_ratio_min,
            b=1.0,
            generator=generator,
        )
        num_masked = math.ceil(num_tokens * ratio.item())
        orders = torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch)])
        mask = torch.zeros(batch, num_tokens)
        mask.scatter_(1, orders[:, :num_masked], 1.0)
        return mask.to(device)

    def text_to_image_loss(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        timesteps: torch.LongTensor | None = None,
        noise: torch.Tensor | None = None,
        return_conditions: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ):
        """MAR's diffusion loss on the masked tokens, conditioned on the prompt through the LLM in one pass.

        The prompt is `input_ids` (b, L) or its `inputs_embeds` (b, L, d_llm). Give `pixel_values` or pre-encoded
        `latents` (b, h, w, c); `mask` (b, h*w), `timesteps` and `noise` (for the `diffusion_batch_mul`-times
        repeated tokens, repeat-major) are drawn at random unless given.
        """
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if latents is None:
            latents = self.encode_images(pixel_values)
        batch, height, width, channels = latents.shape
        num_tokens = height * width
        target = latents.reshape(batch, num_tokens, channels).float()
        if mask is None:
            mask = self.random_mask(batch, num_tokens, device=latents.device)
        round_output = self.run_round(
            target,
            mask,
            (height, width),
            prompt_cache=None,
            prompt_attention_mask=attention_mask,
            prompt_inputs_embeds=inputs_embeds,
        )
        repeats = self.config.diffusion_batch_mul
        target = target.reshape(batch * num_tokens, channels).repeat(repeats, 1)
        conditions = round_output.conditions.reshape(batch * num_tokens, -1).repeat(repeats, 1)
        token_mask = mask.reshape(batch * num_tokens).repeat(repeats).float()
        if timesteps is None:
            timesteps = torch.randint(0, self.config.num_train_timesteps, (len(target),), device=target.device)
        if noise is None:
            noise = torch.randn_like(target)
        per_token = self.diffusion_head.loss(target, conditions, timesteps, noise)["loss"]
        loss = (per_token * token_mask).sum() / token_mask.sum()
        return (loss, round_output.conditions) if return_conditions else loss

    def reconstruction_loss(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                            **kwargs) -> torch.Tensor:
        """RecA's reconstruction alignment (arXiv 2509.07295): the text-to-image loss of an image whose prompt holds,
        at its placeholders, the model's own understanding features of that image instead of a caption.

        input_ids (b, L) hold one image's placeholders each (`HarmonProcessor` prompts), pixel_values (b, 3, H, W)
        are both what is understood and what is reconstructed. The image is encoded once: the target latents and the
        understanding features (whole image, gradient scaled by `visual_gradient_scale`) come from the same latents.
        Other keywords (`mask`, `timesteps`, `noise`) go to `text_to_image_loss`.
        """
        latents = self.encode_images(pixel_values)  # (b, h, w, c)
        features = self.latent_image_features(latents).pooler_output  # (b, h*w + buffer_size, d_llm)
        inputs_embeds = self.place_image_features(input_ids, self.get_input_embeddings()(input_ids), features)
        return self.text_to_image_loss(None, attention_mask, latents=latents, inputs_embeds=inputs_embeds, **kwargs)


class HarmonForConditionalGeneration(HarmonPreTrainedModel, GenerationMixin):
    """Harmon with the LM head: understanding (`forward`, `generate`) and image generation (`generate_images`)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: HarmonConfig):
        super().__init__(config)
        self.model = HarmonModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # Saved with the model (generation_config.json), so that a converted or trained folder carries them. Not
        # `guidance_scale`/`temperature` at the top level: `generate` would apply those to text. A generation config
        # marked as made from the model config drops such entries when it is read back.
        self.generation_config.image_generation = self.image_generation_defaults
        self.generation_config._from_model_config = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also refuses, before the weights are loaded, a generation config (the folder's, or `generation_config`)
        whose numbers break generation (`check_generation_config`)."""
        generation_config = saved_generation_config(pretrained_model_name_or_path, kwargs)
        if generation_config is not None:
            check_generation_config(generation_config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def generate(self, *args, logits_processor=None, **kwargs):
        """`GenerationMixin.generate`, raising where the logits go NaN or inf instead of answering '!!!!'."""
        checked = LogitsProcessorList([*(logits_processor or []), HarmonNonFiniteLogitsCheck()])
        return super().generate(*args, logits_processor=checked, **kwargs)

    @property
    def image_generation_defaults(self) -> dict:
        """The settings `generate_images` (and the pipeline, the `harmon` command and the demo) use where a call
        gives none: `generation_config.image_generation`, completed by the release's settings for a folder saved
        without them."""
        saved = getattr(self.generation_config, "image_generation", None) or {}
        return {**RELEASE_IMAGE_GENERATION, "num_inference_steps": self.config.num_inference_steps, **saved}

    def image_generation_settings(self, **settings) -> dict:
        """`settings` (num_iter, guidance_scale, ... by name) with each None replaced by the model's default; a
        `preset` comes back as a `HarmonSamplingPreset`."""
        defaults = self.image_generation_defaults
        settings = {name: defaults[name] if value is None else value for name, value in settings.items()}
        if "preset" in settings:
            settings["preset"] = sampling_preset(settings["preset"])
        return settings

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Saved as remote code (`register_for_auto_class`), the folder also answers to the auto classes of
        # understanding (`pipeline("image-text-to-text")`, any-to-any) and of causal LMs.
        if self._auto_class is not None:
            target = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    **{auto_class: target for auto_class in REMOTE_CODE_AUTO_CLASSES}}
        super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode_latents(latents)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        task_batches: dict[str, dict] | None = None,
        task_weights: dict[str, float] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | HarmonTrainingOutput:
        """Understanding: every `image_token_id` in `input_ids` is replaced, in order, by the visual features.

        With `labels` (-100 = ignored) the loss is the next-token cross-entropy, averaged over the batch's label
        tokens or, with `num_items_in_batch` (the Trainer's, under gradient accumulation), summed and divided by it;
        the gradient reaching the visual features is scaled by `config.visual_gradient_scale`.

        Training on several tasks: `task_batches` maps "text_to_image" (prompts and target `pixel_values`),
        "reconstruction" (prompts holding an image's placeholders, and that image as `pixel_values`, see
        `HarmonModel.reconstruction_loss`), "image_to_text" and "text" (inputs with `labels`) to their batches; the output's loss is the sum of the task
        losses weighted by `task_weights` (default 1). One forward per step, whatever the tasks, is what
        distributed wrappers (DDP, FSDP, DeepSpeed) need.
        """
        if task_batches is not None:
            return self.multitask_loss(task_batches, task_weights or {})
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            # kwargs carry the Trainer's num_items_in_batch (the mean over all tokens of an accumulated batch) and
            # shift_labels (labels already shifted, e.g. split for context parallelism).
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def text_to_image_loss(self, *args, **kwargs):
        return self.model.text_to_image_loss(*args, **kwargs)

    def multitask_loss(self, task_batches: dict[str, dict], task_weights: dict[str, float]) -> HarmonTrainingOutput:
        task_losses = {}
        for task, batch in task_batches.items():
            if task == "text_to_image":
                task_losses[task] = self.text_to_image_loss(batch["input_ids"], batch["attention_mask"],
                                                            pixel_values=batch["pixel_values"])
            elif task == "reconstruction":
                task_losses[task] = self.model.reconstruction_loss(batch["input_ids"], batch["attention_mask"],
                                                                   batch["pixel_values"])
            elif task in ("image_to_text", "text"):
                task_losses[task] = self(**batch).loss
            else:
                raise ValueError(f"unknown task {task!r}: expected text_to_image, reconstruction, image_to_text or text")
        loss = sum(task_weights.get(task, 1.0) * value for task, value in task_losses.items())
        return HarmonTrainingOutput(loss=loss, task_losses=task_losses)

    def image_to_text_loss(self, input_ids, attention_mask, pixel_values, labels) -> torch.Tensor:
        return self(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels).loss

    def check_image_generation(
        self,
        prompt_length: int,
        height: int,
        width: int,
        num_iter: int,
        guidance_scale: float,
        guidance_schedule: str,
        temperature: float,
        num_inference_steps: int,
        generator=None,
    ):
        """Refuse, before any compute, settings that the sampler cannot honour; each message names the value."""
        stride = self.config.vae_stride
        for name, value in (("height", height), ("width", width)):
            if not _is_integer(value) or value <= 0 or value % stride:
                raise ValueError(f"{name} must be a positive multiple of {stride}, got {value!r}")
        check_sampling_settings(num_iter=num_iter, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, temperature=temperature,
                                guidance_schedule=guidance_schedule)
        check_generator(generator)
        # The image's tokens and buffer slots follow the prompt in the LLM, so the size is bounded by its positions.
        num_image_positions = (height // stride) * (width // stride) + self.config.buffer_size
        self.model.check_positions(
            prompt_length + num_image_positions, f"a {height}x{width} image after a {prompt_length}-token prompt"
        )

    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_iter: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image_latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        scheduler=None,
        callback=None,
        should_stop=None,
        output_type: str = "pt",
        preset: str | dict | HarmonSamplingPreset | None = None,
        inputs_embeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked-autoregressive text-to-image generation: the one sampling loop, which `HarmonPipeline` runs too.

        `input_ids`/`attention_mask` hold the right-padded prompts in Harmon's template (see
        `HarmonProcessor.generation_inputs`), or `inputs_embeds` (rows, L, d_llm) their input embeddings; with
        guidance (`guidance_scale != 1`) the first half are the conditional prompts and the second half the
        unconditional ones. A sampling setting left at None is the model's (`image_generation_defaults`).
        `image_latents` (b, h, w, c) with `mask` (b, h*w, 1 = generate) regenerates only the masked tokens.
        `scheduler` samples each round's tokens with the diffusion head (default: the reference's,
        `num_inference_steps` of the head's own process; see `HarmonDiffusionHead.sample` for others). `preset`
        ("reference", "fast", "fastest" or a `HarmonSamplingPreset`) trades exactness for speed.

        Randomness: `generator` draws the generation orders, each token's starting noise and the diffusion steps'
        noise; a list of generators (one per image) gives each image the draws it would get alone, at the cost of
        sampling each image's tokens separately. `noise` (b, h, w, c) fixes every token's starting noise instead.

        After each round, `callback(round_index, num_masked, tokens)` sees the tokens (b, h*w, c) and may return
        others to go on with; `should_stop()`, asked before each round, ends the generation early. Returns float32
        pixels (b, 3, H, W), nominally in [-1, 1], or the latents (b, h, w, c) with `output_type="latent"`.
        """
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        num_iter, guidance_scale, guidance_schedule, temperature, num_inference_steps, preset = (
            self.image_generation_settings(
                num_iter=num_iter, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                temperature=temperature, num_inference_steps=num_inference_steps, preset=preset,
            ).values()
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give the prompts as input_ids or as inputs_embeds, not both")
        prompts = input_ids if input_ids is not None else inputs_embeds
        self.check_image_generation(prompts.shape[1], height, width, num_iter, guidance_scale, guidance_schedule,
                                    temperature, num_inference_steps, generator)
        head = self.model.diffusion_head
        if scheduler is None:
            scheduler = head.make_sampling_scheduler(num_inference_steps)
        head.check_scheduler(scheduler)
        with preset.numerics(self.lm_head.weight.device):
            state = self._start_image_generation(input_ids, inputs_embeds, attention_mask, height, width,
                                                 guidance_scale, generator, image_latents, mask, noise,
                                                 reuses_guidance=preset.guidance_refresh > 1)
            (batch, num_tokens), channels = state.mask.shape, state.tokens.shape[-1]
            num_rounds = preset.num_rounds(num_iter, int(state.mask[0].sum()))
            for round_index in range(num_rounds):
                if should_stop is not None and should_stop():
                    break
                # The tokens still masked after this round (cosine schedule), taken in each image's own order.
                num_masked_next = num_masked_after_round(round_index, num_rounds, num_tokens, int(state.mask[0].sum()))
                mask_next = torch.zeros_like(state.mask).scatter_(1, state.orders[:, :num_masked_next], 1.0)
                to_predict = (state.mask - mask_next).bool()  # (b, h*w), as many per image
                if to_predict.any():
                    # (rows, b, n, d_dec): conditional rows, then unconditional
                    conditions = self._round_conditions(state, to_predict, preset.refreshes_guidance(round_index))
                    round_guidance = guidance_scale_at(guidance_scale, guidance_schedule, num_masked_next, num_tokens)
                    steps = preset.diffusion_steps(round_index, num_rounds, num_inference_steps)
                    noise_now = None if state.noise is None else state.noise[to_predict].reshape(batch, -1, channels)
                    sampled = self._sample_tokens(conditions, scheduler, round_guidance, temperature, generator,
                                                  noise_now, steps)
                    refuse_nonfinite_image(sampled, f"latents in round {round_index + 1} of {num_rounds}")
                    state.tokens[to_predict] = sampled.flatten(0, 1).to(state.tokens.dtype)
                state.mask = mask_next
                if callback is not None:
                    replaced = callback(round_index, num_masked_next, state.tokens)
                    state.tokens = state.tokens if replaced is None else replaced
            if output_type == "latent":
                return state.latents
            pixels = self.decode_latents(state.latents).float()
            refuse_nonfinite_image(pixels, "pixels in the VAE's decoding")
            return pixels

    def _start_image_generation(self, input_ids, inputs_embeds, attention_mask, height, width, guidance_scale,
                                generator, image_latents, mask, noise, reuses_guidance: bool) -> HarmonGenerationState:
        """Cache the prompts (and the conditional ones alone, to reuse guidance), set the tokens to keep (inpainting),
        and draw the generation orders."""
        stride = self.config.vae_stride
        prompts = input_ids if input_ids is not None else inputs_embeds
        num_prompts = prompts.shape[0]
        if guidance_scale != 1.0 and num_prompts % 2:
            raise ValueError(f"guidance needs conditional and unconditional prompts in equal numbers, got {num_prompts}")
        batch = num_prompts // 2 if guidance_scale != 1.0 else num_prompts
        grid_size = (height // stride, width // stride)
        num_tokens = grid_size[0] * grid_size[1]
        channels = self.config.token_channels
        device = self.lm_head.weight.device
        if attention_mask is None:
            attention_mask = torch.ones(prompts.shape[:2], dtype=torch.long)
        attention_mask = attention_mask.to(device)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: give one per image")
        if noise is not None:
            if tuple(noise.shape) != (batch, *grid_size, channels):
                raise ValueError(f"noise must have shape ({batch}, {grid_size[0]}, {grid_size[1]}, {channels}) for "
                                 f"the requested size, got {tuple(noise.shape)}")
            noise = noise.reshape(batch, num_tokens, channels).to(device=device, dtype=torch.float32)

        if image_latents is None:
            tokens = torch.zeros(batch, num_tokens, channels, device=device)
            mask = torch.ones(batch, num_tokens, device=device)
        else:
            if tuple(image_latents.shape[:3]) != (batch, *grid_size) or mask is None:
                raise ValueError(
                    f"image_latents must have shape ({batch}, {grid_size[0]}, {grid_size[1]}, c) for the requested "
                    f"size and come with a mask, got {tuple(image_latents.shape)}"
                )
            mask = mask.reshape(batch, num_tokens).to(device=device, dtype=torch.float32)
            if len(set(mask.sum(dim=1).tolist())) != 1 or mask.sum() == 0:
                raise ValueError("every image's mask must cover the same, non-zero number of tokens")
            tokens = image_latents.reshape(batch, num_tokens, -1).to(device=device, dtype=torch.float32)
            tokens = tokens * (1 - mask[..., None])
        # Masked positions come first in every random order, so only they are generated.
        if isinstance(generator, list):
            scores = torch.cat([torch.rand(1, num_tokens, generator=one) for one in generator])
        else:
            scores = torch.rand(batch, num_tokens, generator=generator)
        orders = torch.argsort(scores.to(device) - 2.0 * mask, dim=1)
        input_ids = None if input_ids is None else input_ids.to(device)
        inputs_embeds = None if inputs_embeds is None else inputs_embeds.to(device, self.lm_head.weight.dtype)
        conditional_prompt_cache = None
        if reuses_guidance and guidance_scale != 1.0:
            conditional_prompt_cache = self.model.prefill_prompt(
                None if input_ids is None else input_ids[:batch], attention_mask[:batch],
                None if inputs_embeds is None else inputs_embeds[:batch],
            )
        return HarmonGenerationState(
            prompt_cache=self.model.prefill_prompt(input_ids, attention_mask, inputs_embeds),
            prompt_attention_mask=attention_mask,
            grid_size=grid_size,
            tokens=tokens,
            mask=mask,
            orders=orders,
            noise=noise,
            conditional_prompt_cache=conditional_prompt_cache,
        )

    def _round_conditions(self, state: HarmonGenerationState, to_predict: torch.Tensor,
                          refresh_guidance: bool) -> torch.Tensor:
        """The decoder's conditions for the tokens `to_predict` (b, h*w, n per image) of every prompt row:
        (rows, b, n, d_dec).

        With guidance reuse, a round that does not `refresh_guidance` runs the conditional prompts alone and takes
        the unconditional conditions as conditional minus the difference kept from the last refreshed round.
        """
        batch, num_tokens = state.mask.shape
        reuses = state.conditional_prompt_cache is not None and not refresh_guidance
        round_output = self.model.run_round(
            state.tokens,
            state.mask,
            state.grid_size,
            state.conditional_prompt_cache if reuses else state.prompt_cache,
            state.prompt_attention_mask[:batch] if reuses else state.prompt_attention_mask,
        )
        conditions = round_output.conditions.reshape(-1, batch, num_tokens, round_output.conditions.shape[-1])
        if state.conditional_prompt_cache is not None:
            if reuses:
                conditions = torch.stack([conditions[0], conditions[0] - state.guidance_difference])
            else:
                state.guidance_difference = conditions[0] - conditions[1]
        return conditions[:, to_predict].reshape(conditions.shape[0], batch, -1, conditions.shape[-1])

    def _sample_tokens(self, conditions, scheduler, guidance_scale, temperature, generator, noise,
                       num_inference_steps) -> torch.Tensor:
        """One round's tokens (b, n, c) under `conditions` (rows, b, n, d_dec), from `noise` (b, n, c) if given:
        all images at once, or one image at a time with its own generator (a list)."""
        head = self.model.diffusion_head
        rows, batch, num_new, _ = conditions.shape
        if not isinstance(generator, list):
            sampled = head.sample(conditions.flatten(0, 2), scheduler, guidance_scale, temperature, generator,
                                  None if noise is None else noise.flatten(0, 1), num_inference_steps)
            return sampled[: batch * num_new].reshape(batch, num_new, -1)
        return torch.stack([
            head.sample(conditions[:, image].flatten(0, 1), scheduler, guidance_scale, temperature, generator[image],
                        None if noise is None else noise[image], num_inference_steps)[:num_new]
            for image in range(batch)
        ])


__all__ = [
    "HarmonForConditionalGeneration",
    "HarmonModel",
    "HarmonPreTrainedModel",
    "HarmonSamplingPreset",
    "SAMPLING_PRESETS",
]
