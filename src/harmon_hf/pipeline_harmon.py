"""HarmonPipeline: text-to-image generation and inpainting with Harmon, in diffusers' conventions."""

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import diffusers
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import AutoModel, AutoProcessor

from . import bundled_model
from .modeling import (HarmonDiffusionScheduler, HarmonForConditionalGeneration, HarmonProcessor,
                       HarmonSamplingPreset)
from .modeling.modeling_harmon import sampling_preset


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _one_call_at_a_time(call):
    """The scheduler and the interrupt flag are state of the call in progress: calls of one pipeline from several
    threads take turns (re-entrant, so that a callback may call the pipeline)."""

    @functools.wraps(call)
    def call_alone(pipeline, *args, **kwargs):
        with pipeline._call_lock:
            return call(pipeline, *args, **kwargs)

    return call_alone


@dataclass
class HarmonPipelineOutput(BaseOutput):
    """`images`: PIL images, a uint8 array (b, H, W, 3), a uint8 tensor (b, 3, H, W), or latents (b, h, w, c)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class HarmonPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with Harmon: `num_iter` masked-autoregressive rounds, each sampling its tokens with the
    diffusion head under `scheduler` (by default the reference's 100-step process; any diffusers scheduler with the
    head's prediction type can take its place, e.g. `DPMSolverMultistepScheduler` for fewer steps).

    Loads from the same folder or Hub repository as the model: `HarmonPipeline.from_pretrained("path/or/hub-id")`.
    """

    model_cpu_offload_seq = "model"
    _optional_components = ["scheduler"]  # made from the model's own process when not given, yet a component
    _callback_tensor_inputs = ["tokens"]

    def __init__(self, model: HarmonForConditionalGeneration, processor: HarmonProcessor, scheduler=None):
        super().__init__()
        if scheduler is None:
            scheduler = HarmonDiffusionScheduler.from_config(model.model.diffusion_head.noise_scheduler.config)
        self.register_modules(model=model, processor=processor, scheduler=scheduler)
        self._call_lock = threading.RLock()  # see _one_call_at_a_time

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, dtype=None, trust_remote_code=False, torch_dtype=None,
                        **kwargs):
        """Model and processor from one model folder or Hub repository; its `scheduler/` subfolder if it has one.
        Without a name: Harmon-Shapes, the small model bundled with harmon-hf. `torch_dtype` is the older spelling
        of `dtype`."""
        dtype = dtype if dtype is not None else torch_dtype
        if pretrained_model_name_or_path is None:
            pretrained_model_name_or_path = bundled_model.bundled_model_path()
            if pretrained_model_name_or_path is None:
                raise ValueError("no model given and no bundled model is installed: pass a model folder or Hub id")
        model = AutoModel.from_pretrained(
            pretrained_model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
        processor = AutoProcessor.from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code)
        scheduler = None
        if (Path(pretrained_model_name_or_path) / "scheduler").is_dir():
            config = HarmonDiffusionScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler")
            name = config.get("_class_name")
            if name == HarmonDiffusionScheduler.__name__:
                scheduler_class = HarmonDiffusionScheduler
            elif isinstance(name, str) and name.endswith("Scheduler") and hasattr(diffusers, name):
                scheduler_class = getattr(diffusers, name)
            else:
                raise ValueError(
                    f"{Path(pretrained_model_name_or_path) / 'scheduler'}: _class_name must name a diffusers scheduler "
                    f"or {HarmonDiffusionScheduler.__name__}, got {name!r}"
                )
            scheduler = scheduler_class.from_config(config)
        return cls(model=model.eval(), processor=processor, scheduler=scheduler)

    def save_pretrained(self, save_directory, **kwargs):
        """One folder that loads with both `AutoModel` and `HarmonPipeline`."""
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)
        self.scheduler.save_pretrained(Path(save_directory) / "scheduler")

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance of the call in progress (or the last call)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        """The masked-autoregressive rounds of the call in progress (or the last call): the preset may run fewer
        than `num_iter`."""
        return self._num_timesteps

    def check_inputs(self, prompt, negative_prompt, num_images_per_prompt, output_type, image, mask_image,
                     callback_on_step_end_tensor_inputs):
        """The pipeline's own inputs; the sampling settings are the model's to check (`check_image_generation`)."""
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if len(negative_prompt) != (1 if isinstance(prompt, str) else len(prompt)):
                raise ValueError("negative_prompt must be one string or one per prompt")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if (image is None) != (mask_image is None):
            raise ValueError("inpainting needs both image and mask_image")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {unknown}")
        config = self.scheduler.config
        if not isinstance(self.scheduler, HarmonDiffusionScheduler) and config.get("variance_type") in ("learned", "learned_range"):
            raise ValueError(
                f"{type(self.scheduler).__name__} would cut the head's output to 3 channels for its learned variance; "
                "create it with variance_type=None, e.g. DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, "
                "variance_type=None)"
            )
        head_predicts = self.model.config.diffusion_prediction_type
        if config.get("prediction_type", head_predicts) != head_predicts:
            raise ValueError(
                f"{type(self.scheduler).__name__} has prediction_type={config.prediction_type!r}, but the model's "
                f"diffusion head predicts {head_predicts!r}; create the scheduler from pipe.scheduler.config"
            )

    def encode_prompt(self, prompt, negative_prompt, num_images_per_prompt, guidance_scale):
        """Token ids of the conditional prompts, then (with guidance) of the unconditional ones."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negative_prompt = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
        inputs = self.processor.generation_inputs(prompts, negative_prompt)
        if guidance_scale == 1.0:
            return inputs["input_ids"][: len(prompts)], inputs["attention_mask"][: len(prompts)]
        return inputs["input_ids"], inputs["attention_mask"]

    def prepare_inpainting(self, image, mask_image, height, width, batch):
        """Latents of `image` resized to height x width, and the token mask: a token is regenerated when any pixel of
        its patch is white (> 127) in `mask_image`."""
        image_processor = self.processor.image_processor
        image = image.convert("RGB").resize((width, height), resample=image_processor.resample)
        pixels = torch.from_numpy(image_processor.normalize(np.asarray(image)))[None]
        latents = self.model.encode_images(pixels.to(self.device, self.model.dtype)).float()
        stride = self.model.config.vae_stride
        mask = np.asarray(mask_image.convert("L").resize((width, height), resample=PIL.Image.NEAREST)) > 127
        mask = torch.from_numpy(mask).float()[None, None]
        token_mask = torch.nn.functional.max_pool2d(mask, stride).flatten(1)  # (1, h*w)
        if token_mask.sum() == 0:
            raise ValueError("mask_image masks nothing: paint the region to regenerate in white")
        return latents.expand(batch, -1, -1, -1), token_mask.expand(batch, -1)

    @staticmethod
    def prepare_outpainting(image: PIL.Image.Image, left=0, top=0, right=0, bottom=0):
        """`image` on a larger canvas and the mask of the added border, for `pipe(prompt, image=..., mask_image=...)`."""
        width, height = image.size
        canvas = PIL.Image.new("RGB", (width + left + right, height + top + bottom), (127, 127, 127))
        canvas.paste(image.convert("RGB"), (left, top))
        mask = PIL.Image.new("L", canvas.size, 255)
        mask.paste(0, (left, top, left + width, top + height))
        return canvas, mask

    @torch.no_grad()
    @_one_call_at_a_time
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_iter: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        num_inference_steps: int | None = None,
        preset: str | dict | HarmonSamplingPreset | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        image: PIL.Image.Image | None = None,
        mask_image: PIL.Image.Image | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("tokens",),
    ) -> HarmonPipelineOutput | tuple:
        r"""
        Generate images from `prompt`, or regenerate the white region of `mask_image` in `image` (inpainting;
        outpainting with `prepare_outpainting`). One pipeline serves one call at a time: calls from several threads
        wait for each other, and each gets the images it would get alone.

        Args:
            prompt: the text, or a list of texts.
            negative_prompt: replaces Harmon's unconditional prompt "Generate an image." in guidance.
            height, width: pixels, multiples of 16 (default: the model's image size, or `image`'s size).
            num_iter, guidance_scale, guidance_schedule, temperature, num_inference_steps: None (the default) takes
                the model's setting, `pipe.model.image_generation_defaults` (its generation_config; for the
                releases 64 rounds, guidance 3.0, constant, temperature 1.0, 100 steps).
            num_iter: masked-autoregressive rounds (K).
            guidance_scale: classifier-free guidance; 1.0 disables it.
            guidance_schedule: "constant", or "linear" (growing with the share of generated tokens).
            temperature: scales the noise of each diffusion step (Harmon's scheduler only).
            num_inference_steps: diffusion steps per round.
            preset: "reference" (the reference sampler, bit for bit), "fast", "fastest" or a `HarmonSamplingPreset`
                (see `SAMPLING_PRESETS`; the README measures each).
            num_images_per_prompt: images per prompt.
            generator: a `torch.Generator`; the same seed gives the same images.
            output_type: "pil", "np", "pt" (uint8) or "latent".
            callback_on_step_end: `callback(pipe, round_index, num_masked, {"tokens": ...})` after each round; it
                may return `{"tokens": ...}` to replace them. Set `pipe._interrupt = True` to stop early.
        """
        # 1. Check inputs (None: `image`'s size, else the model's defaults)
        default_size = self.model.config.image_size
        height = height if height is not None else image.height if image is not None else default_size
        width = width if width is not None else image.width if image is not None else default_size
        num_iter, guidance_scale, guidance_schedule, temperature, num_inference_steps, preset = (
            self.model.image_generation_settings(
                num_iter=num_iter, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                temperature=temperature, num_inference_steps=num_inference_steps, preset=preset,
            ).values()
        )
        preset = sampling_preset(preset)
        self._guidance_scale = guidance_scale
        self.check_inputs(prompt, negative_prompt, num_images_per_prompt, output_type, image, mask_image,
                          callback_on_step_end_tensor_inputs)
        self._interrupt = False

        # 2. Encode the prompt, and check the settings against it before any compute
        input_ids, attention_mask = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
        self.model.check_image_generation(input_ids.shape[1], height, width, num_iter, guidance_scale,
                                          guidance_schedule, temperature, num_inference_steps)
        batch = input_ids.shape[0] // (2 if guidance_scale != 1.0 else 1)

        # 3. Prepare the tokens to keep (inpainting)
        image_latents = token_mask = None
        if image is not None:
            image_latents, token_mask = self.prepare_inpainting(image, mask_image, height, width, batch)

        # 4. Masked-autoregressive rounds: the model's sampling loop, with this pipeline's scheduler and callbacks
        grid_tokens = (height // self.model.config.vae_stride) * (width // self.model.config.vae_stride)
        self._num_timesteps = preset.num_rounds(num_iter, grid_tokens if token_mask is None else int(token_mask[0].sum()))
        with self.progress_bar(total=self._num_timesteps) as progress_bar:

            def after_round(round_index, num_masked, tokens):
                progress_bar.update()
                if callback_on_step_end is None:
                    return None
                tensors = {"tokens": tokens} if "tokens" in callback_on_step_end_tensor_inputs else {}
                return (callback_on_step_end(self, round_index, num_masked, tensors) or {}).get("tokens")

            # latents (b, h, w, c), or the VAE's pixels (b, 3, H, W)
            generated = self.model.generate_images(
                input_ids, attention_mask, height, width, num_iter, guidance_scale, guidance_schedule, temperature,
                num_inference_steps, generator, image_latents, token_mask, scheduler=self.scheduler,
                callback=after_round, should_stop=lambda: self.interrupt,
                output_type="latent" if output_type == "latent" else "pt", preset=preset,
            )

        # 5. Postprocess
        if output_type == "latent":
            images = generated
        else:
            images = self.processor.image_processor.postprocess(generated, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return HarmonPipelineOutput(images=images)
