"""The diffusion process of Harmon's per-token diffusion head, as a diffusers scheduler.

MAR's head uses improved-DDPM's process: a cosine schedule, epsilon prediction and a learned interpolation between
the posterior variance and beta ("learned_range"). A head may instead predict v = sqrt(alpha_bar) epsilon -
sqrt(1 - alpha_bar) x_0 (`prediction_type="v_prediction"`, Salimans & Ho, 2022), whose loss keeps weight on the
clean latent near t = T, where epsilon's loss has almost none. `DDPMScheduler` already has the schedule, the
timestep respacing and the forward process; this subclass adds what sampling and training with such a head also
need: a sampling temperature, externally supplied noise, improved-DDPM's "clipped" posterior log-variance and the
variational bound. Every coefficient is computed in float64 and cast at use, as in the reference: diffusers builds
the schedule in float32, where 1 - alpha_bar near t = 0 keeps only three significant digits.
"""

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


# What a head may predict: MAR's epsilon, or v (see above).
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class HarmonSchedulerOutput(BaseOutput):
    """`prev_sample` is x_{t-1}; `mean` and `log_variance` describe the Gaussian it was drawn from."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    mean: torch.Tensor
    log_variance: torch.Tensor


class HarmonDiffusionScheduler(DDPMScheduler):
    # `step` takes the head's whole output, prediction and variance values (2c channels), and a temperature. Read by
    # the head through this attribute, not isinstance: a pipeline folder loads this class from a copy of its own.
    takes_learned_variance = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        variance_type: str = "learned_range",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            variance_type=variance_type,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
        )
        if variance_type != "learned_range" or prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"HarmonDiffusionScheduler models learned-range variance with prediction_type one of "
                f"{PREDICTION_TYPES}, got variance_type={variance_type!r}, prediction_type={prediction_type!r}"
            )
        self.alpha_bar_float64 = cosine_alpha_bar(num_train_timesteps)
        self.alphas_cumprod = self.alpha_bar_float64.float()
        self._build_process(torch.arange(num_train_timesteps))

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
        self._build_process(self.timesteps.flip(0).cpu())

    def _build_process(self, kept_timesteps: torch.Tensor):
        """Tables of the (possibly respaced) process over `kept_timesteps` (ascending), indexed by position."""
        alpha_bar = self.alpha_bar_float64[kept_timesteps]
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        beta = 1.0 - alpha_bar / alpha_bar_prev
        posterior_variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # The posterior variance is 0 at the first step; improved DDPM uses the second step's value there.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(beta) > 1 else beta
        self._process = {
            "sqrt_recip_alpha_bar": (1.0 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1.0 / alpha_bar - 1.0).sqrt(),
            "posterior_coef_x0": beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "posterior_coef_xt": (1.0 - alpha_bar_prev) * (1.0 - beta).sqrt() / (1.0 - alpha_bar),
            "posterior_log_variance": clipped.log(),
            "log_beta": beta.log(),
        }
        self._position_of_timestep = torch.full((self.config.num_train_timesteps,), -1, dtype=torch.long)
        self._position_of_timestep[kept_timesteps] = torch.arange(len(kept_timesteps))

    def _coefficient(self, name: str, timesteps, like: torch.Tensor) -> torch.Tensor:
        """`name`'s value at each timestep, shaped to broadcast against `like` (one row per timestep)."""
        timesteps = torch.as_tensor(timesteps).cpu()
        positions = self._position_of_timestep[timesteps]
        if (positions < 0).any():
            raise ValueError(f"timesteps {timesteps.tolist()} are not all steps of the current process")
        return _broadcast_like(self._process[name][positions], like)

    def _signal_and_noise_scales(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) at timesteps of the original process, broadcast to `like`."""
        alpha_bar = self.alpha_bar_float64[torch.as_tensor(timesteps).cpu()]
        return _broadcast_like(alpha_bar.sqrt(), like), _broadcast_like((1.0 - alpha_bar).sqrt(), like)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, for timesteps of the original process."""
        signal_scale, noise_scale = self._signal_and_noise_scales(timesteps, original_samples)
        return signal_scale * original_samples + noise_scale * noise

    def training_target(self, original_samples, noise, timesteps):
        """What the head learns to predict: the noise, or v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0."""
        if self.config.prediction_type == "epsilon":
            return noise
        signal_scale, noise_scale = self._signal_and_noise_scales(timesteps, original_samples)
        return signal_scale * noise - noise_scale * original_samples

    def original_from_prediction(self, prediction, sample, timesteps):
        """The clean latent x_0 implied by the head's prediction for x_t = `sample`."""
        if self.config.prediction_type == "epsilon":
            return (
                self._coefficient("sqrt_recip_alpha_bar", timesteps, sample) * sample
                - self._coefficient("sqrt_recipm1_alpha_bar", timesteps, sample) * prediction
            )
        # Directly, not through epsilon: near t = T that route cancels two terms ~2e4 times larger than x_0.
        signal_scale, noise_scale = self._signal_and_noise_scales(timesteps, sample)
        return signal_scale * sample - noise_scale * prediction

    def posterior_mean_log_variance(self, x_start, x_t, timesteps):
        """Mean and (clipped) log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._coefficient("posterior_coef_x0", timesteps, x_t) * x_start
            + self._coefficient("posterior_coef_xt", timesteps, x_t) * x_t
        )
        return mean, self._coefficient("posterior_log_variance", timesteps, x_t).expand_as(x_t)

    def model_mean_log_variance(self, model_output, x_t, timesteps, clip: bool = False):
        """Predicted x_0, and mean and log-variance of p(x_{t-1} | x_t) for a model output `[prediction, variance
        value]`; `clip` clamps the predicted x_0 to +-clip_sample_range (improved DDPM's `clip_denoised`)."""
        prediction, variance_value = model_output.split(x_t.shape[-1], dim=-1)
        pred_original = self.original_from_prediction(prediction, x_t, timesteps)
        if clip:
            pred_original = pred_original.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean, min_log = self.posterior_mean_log_variance(pred_original, x_t, timesteps)
        max_log = self._coefficient("log_beta", timesteps, x_t)
        fraction = (variance_value + 1) / 2
        return pred_original, mean, fraction * max_log + (1 - fraction) * min_log

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> HarmonSchedulerOutput | tuple:
        """One reverse step. `variance_noise` replaces the noise drawn from `generator`; `temperature` scales it."""
        # Sampling only (the variational bound in training never clips). Near t = T, 1 / sqrt(alpha_bar) is about 2e4,
        # so a head that is not exact there sends x_0, and with it every later step, far out of range unless clipped.
        pred_original, mean, log_variance = self.model_mean_log_variance(model_output, sample, timestep,
                                                                          clip=self.config.clip_sample)
        prev_sample = mean
        if int(timestep) > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = mean + torch.exp(0.5 * log_variance) * variance_noise * temperature
        if not return_dict:
            return (prev_sample, pred_original)
        return HarmonSchedulerOutput(prev_sample, pred_original, mean, log_variance)

    def variational_bound(self, model_output, x_start, x_t, timesteps) -> torch.Tensor:
        """Per-row variational-bound term in bits: KL(q || p) for t > 0, the decoder NLL at t = 0."""
        true_mean, true_log_variance = self.posterior_mean_log_variance(x_start, x_t, timesteps)
        _, mean, log_variance = self.model_mean_log_variance(model_output, x_t, timesteps)
        kl = gaussian_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance).mean(dim=-1) / math.log(2.0)
        return torch.where(torch.as_tensor(timesteps, device=x_t.device) == 0, nll, kl)


def cosine_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar of the cosine schedule with betas clipped at `max_beta` (improved DDPM), in float64."""

    def unclipped(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - unclipped((i + 1) / n) / unclipped(i / n), max_beta) for i in range(n)]
    return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0)


def _broadcast_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def gaussian_kl(mean_1, log_variance_1, mean_2, log_variance_2):
    return 0.5 * (
        -1.0
        + log_variance_2
        - log_variance_1
        + torch.exp(log_variance_1 - log_variance_2)
        + (mean_1 - mean_2) ** 2 * torch.exp(-log_variance_2)
    )


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of `x` (data in [-1, 1] quantised to 8 bits) under a Gaussian, as in improved DDPM."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


__all__ = ["HarmonDiffusionScheduler", "HarmonSchedulerOutput"]
