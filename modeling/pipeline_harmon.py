"""HarmonPipeline: text-to-image generation and inpainting with Harmon, in diffusers' conventions.

This file imports nothing from beside it: a pipeline folder carries it as the custom pipeline of its
`model_index.json`, which diffusers loads on its own (`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`).
"""

import functools
import json
import numbers
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import diffusers
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from huggingface_hub import create_repo, upload_folder
from transformers import AutoModel, AutoProcessor, PreTrainedConfig
from transformers.utils import cached_file


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The model_type of a Harmon model's config.json.
HARMON_MODEL_TYPE = "harmon"
# A pipeline folder (diffusers' layout) keeps each component in the subfolder of its name; a model folder
# (transformers' layout) has the model and the processor at its root, and may have a scheduler/ subfolder.
COMPONENT_FOLDERS = ("model", "processor", "scheduler")
# Where each component's code sits in a pipeline folder: the file beside its configuration, by component.
COMPONENT_MODULES = {"model": "modeling_harmon", "processor": "processing_harmon", "scheduler": "scheduling_harmon"}
# Arguments of `from_pretrained` that say which revision of which repository, from where: every part honours them.
HUB_ARGUMENTS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
# What `save_pretrained(..., push_to_hub=True)` takes, as diffusers' pipelines do.
UPLOAD_ARGUMENTS = ("repo_id", "token", "private", "commit_message", "create_pr")


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

    Components: `model` ([`HarmonForConditionalGeneration`]), `processor` ([`HarmonProcessor`]) and `scheduler`.
    """

    model_cpu_offload_seq = "model"
    _optional_components = ["scheduler"]  # made from the model's own process when not given, yet a component
    _callback_tensor_inputs = ["latents"]

    def __init__(self, model, processor, scheduler=None):
        super().__init__()
        if scheduler is None:
            noise_scheduler = model.model.diffusion_head.noise_scheduler
            scheduler = type(noise_scheduler).from_config(noise_scheduler.config)
        self.register_modules(model=model, processor=processor, scheduler=scheduler)
        self._call_lock = threading.RLock()  # see _one_call_at_a_time

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=None, trust_remote_code: bool = False,
                        torch_dtype=None, **kwargs):
        """The pipeline of a pipeline folder (`save_pretrained`), or of a model folder (what `harmon convert` and
        `model.save_pretrained` write: model and processor at its root, and its `scheduler/` if it has one), local
        or on the Hub. `revision`, `token`, `cache_dir`, `local_files_only` reach every component; other keyword
        arguments go to the model's `from_pretrained` (e.g. `device_map`, `quantization_config`). `torch_dtype` is
        the older spelling of `dtype`."""
        dtype = dtype if dtype is not None else torch_dtype
        hub = {name: kwargs.pop(name) for name in HUB_ARGUMENTS if name in kwargs}
        source = str(pretrained_model_name_or_path)
        is_pipeline_folder = _has_file(source, "model_index.json", hub)
        model_folder, processor_folder = ("model", "processor") if is_pipeline_folder else ("", "")
        model_type = PreTrainedConfig.get_config_dict(source, subfolder=model_folder, **hub)[0].get("model_type")
        if model_type != HARMON_MODEL_TYPE:  # AutoModel would build that model, at its default size
            raise ValueError(f"{source}: model_type is {model_type!r}, but a Harmon model's must be "
                             f"{HARMON_MODEL_TYPE!r}: this is not a Harmon model folder")
        model = AutoModel.from_pretrained(source, subfolder=model_folder, dtype=dtype,
                                          trust_remote_code=trust_remote_code, **hub, **kwargs)
        processor = AutoProcessor.from_pretrained(source, subfolder=processor_folder,
                                                  trust_remote_code=trust_remote_code, **hub)
        scheduler = None
        if _has_file(source, "scheduler/scheduler_config.json", hub):
            scheduler = _load_scheduler(source, model, hub)
        return cls(model=model.eval(), processor=processor, scheduler=scheduler)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """A pipeline folder in diffusers' layout: `model/`, `processor/` and `scheduler/`, each with its code, and
        `model_index.json` naming this file as its pipeline, so that it loads with `HarmonPipeline.from_pretrained`,
        and with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` where harmon_hf is not
        installed; `model/` is a model folder like any other. `push_to_hub` (with diffusers' `repo_id`, `token`,
        `private`, `commit_message`, `create_pr`) uploads the folder once it is complete."""
        upload = {name: kwargs.pop(name) for name in UPLOAD_ARGUMENTS if name in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        pipeline_code = Path(__file__)
        shutil.copyfile(pipeline_code, save_directory / pipeline_code.name)
        index = json.loads((save_directory / "model_index.json").read_text())
        index["_class_name"] = [pipeline_code.stem, type(self).__name__]
        for name in COMPONENT_FOLDERS:
            component = getattr(self, name)
            code = Path(sys.modules[type(component).__module__].__file__)
            if code.stem == COMPONENT_MODULES[name]:  # Harmon's own class; a diffusers scheduler stays as it is
                shutil.copyfile(code, save_directory / name / code.name)
                index[name] = [code.stem, type(component).__name__]
        (save_directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            repo_id = create_repo(upload.get("repo_id", save_directory.name), exist_ok=True,
                                  private=upload.get("private"), token=upload.get("token")).repo_id
            upload_folder(repo_id=repo_id, folder_path=save_directory, token=upload.get("token"),
                          commit_message=upload.get("commit_message"), create_pr=upload.get("create_pr", False))

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
                     callback_on_step_end_tensor_inputs, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                     negative_prompt_attention_mask):
        """The pipeline's own inputs; the sampling settings and the scheduler are the model's to check
        (`check_image_generation`, `diffusion_head.check_scheduler`)."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt (or prompt_embeds): got neither")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt_embeds is not None:
            if negative_prompt is not None:
                raise ValueError("with prompt_embeds, give negative_prompt_embeds instead of negative_prompt")
            for name, embeds, mask in (("prompt", prompt_embeds, prompt_attention_mask),
                                       ("negative_prompt", negative_prompt_embeds, negative_prompt_attention_mask)):
                if embeds is None:
                    continue
                if embeds.ndim != 3 or embeds.shape[-1] != self.model.get_input_embeddings().embedding_dim:
                    raise ValueError(f"{name}_embeds must have shape (batch, length, "
                                     f"{self.model.get_input_embeddings().embedding_dim}), got {tuple(embeds.shape)}")
                if mask is None or tuple(mask.shape) != tuple(embeds.shape[:2]):
                    raise ValueError(f"{name}_embeds need {name}_attention_mask of shape {tuple(embeds.shape[:2])}")
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ValueError(f"negative_prompt_embeds has {negative_prompt_embeds.shape[0]} rows for "
                                 f"{prompt_embeds.shape[0]} prompts")
        elif not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not (isinstance(negative_prompt, list) and all(isinstance(n, str) for n in negative_prompt)):
                raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
            if len(negative_prompt) != (1 if isinstance(prompt, str) else len(prompt)):
                raise ValueError("negative_prompt must be one string or one per prompt")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if (image is None) != (mask_image is None):
            raise ValueError("inpainting needs both image and mask_image")
        for name, value in (("image", image), ("mask_image", mask_image)):
            if value is not None and not isinstance(value, PIL.Image.Image):
                raise ValueError(f"{name} must be a PIL image (PIL.Image.Image), got {type(value).__name__}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {unknown}")
        self.model.model.diffusion_head.check_scheduler(self.scheduler)

    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, prompt_embeds=None, prompt_attention_mask=None,
                      negative_prompt_embeds=None, negative_prompt_attention_mask=None):
        """The LLM's input embeddings (b, L, d_llm) of the prompts in Harmon's template and their attention masks
        (b, L), each repeated `num_images_per_prompt` times: `(prompt_embeds, prompt_attention_mask,
        negative_prompt_embeds, negative_prompt_attention_mask)`, the negative ones None without guidance.

        The negative prompt defaults to Harmon's unconditional "Generate an image."; embeddings given are passed
        through (the negative ones default to the unconditional prompt's).
        """
        embed = self.model.get_input_embeddings()
        device = embed.weight.device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            inputs = self.processor.generation_inputs(prompts, negative_prompt)
            embeds, mask = embed(inputs["input_ids"].to(device)), inputs["attention_mask"].to(device)
            prompt_embeds, negative_prompt_embeds = embeds.chunk(2)
            prompt_attention_mask, negative_prompt_attention_mask = mask.chunk(2)
        elif negative_prompt_embeds is None and do_classifier_free_guidance:
            unconditional = self.processor.tokenizer([self.processor.apply_unconditional_template()],
                                                     add_special_tokens=False, return_tensors="pt")
            rows = prompt_embeds.shape[0]
            negative_prompt_embeds = embed(unconditional["input_ids"].to(device)).expand(rows, -1, -1)
            negative_prompt_attention_mask = unconditional["attention_mask"].to(device).expand(rows, -1)
        repeat = functools.partial(torch.repeat_interleave, repeats=num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return repeat(prompt_embeds), repeat(prompt_attention_mask), None, None
        return (repeat(prompt_embeds), repeat(prompt_attention_mask), repeat(negative_prompt_embeds),
                repeat(negative_prompt_attention_mask))

    def prepare_inpainting(self, image, mask_image, height, width, batch):
        """Latents of `image` resized to height x width, and the token mask: a token is regenerated when any pixel of
        its patch is white (> 127) in `mask_image`."""
        image_processor = self.processor.image_processor
        image_processor.check_image_size(*mask_image.size)  # before either is decoded
        image = image_processor.to_rgb(image).resize((width, height), resample=image_processor.resample)
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
        """`image` on a larger canvas and the mask of the added border, for `pipe(prompt, image=..., mask_image=...)`;
        each margin is the pixels added on that side."""
        for name, margin in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
            if not isinstance(margin, numbers.Integral) or isinstance(margin, bool) or margin < 0:
                raise ValueError(f"{name} must be a number of pixels >= 0 to add, got {margin!r}")
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
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_iter: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        num_inference_steps: int | None = None,
        preset=None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        image: PIL.Image.Image | None = None,
        mask_image: PIL.Image.Image | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
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
            generator: a `torch.Generator`, or one per image; the same seeds give the same images, and with one
                generator per image each image is the one that generator gives alone.
            latents: (b, h, w, c) float32, every latent token's starting noise (h = height / 16, c = the token
                channels), instead of drawing it; the generation order and the diffusion steps' noise still come
                from `generator`.
            prompt_embeds, prompt_attention_mask: the LLM's input embeddings (b, L, d_llm) of prompts already in
                Harmon's template (`encode_prompt`) and their masks (b, L), instead of `prompt`;
                `negative_prompt_embeds`/`negative_prompt_attention_mask` likewise for the unconditional half.
            output_type: "pil", "np", "pt" (uint8) or "latent".
            callback_on_step_end: `callback(pipe, round_index, num_masked, {"latents": ...})` after each round, or a
                diffusers `PipelineCallback`; `latents` (b, h, w, c) holds the tokens so far (zeros where still
                masked), and it may return `{"latents": ...}` to replace them. Set `pipe._interrupt = True` to stop.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs (sizes left at None: `image`'s, else the model's defaults)
        self.check_inputs(prompt, negative_prompt, num_images_per_prompt, output_type, image, mask_image,
                          callback_on_step_end_tensor_inputs, prompt_embeds, prompt_attention_mask,
                          negative_prompt_embeds, negative_prompt_attention_mask)
        default_size = self.model.config.image_size
        height = height if height is not None else image.height if image is not None else default_size
        width = width if width is not None else image.width if image is not None else default_size
        num_iter, guidance_scale, guidance_schedule, temperature, num_inference_steps, preset = (
            self.model.image_generation_settings(
                num_iter=num_iter, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                temperature=temperature, num_inference_steps=num_inference_steps, preset=preset,
            ).values()
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False

        # 2. Encode the prompts: conditional rows, then (with guidance) unconditional rows
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, self.do_classifier_free_guidance,
                               prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                               negative_prompt_attention_mask)
        )
        batch = prompt_embeds.shape[0]
        if self.do_classifier_free_guidance:
            prompt_embeds, prompt_attention_mask = _stack_right_padded(
                [prompt_embeds, negative_prompt_embeds], [prompt_attention_mask, negative_prompt_attention_mask]
            )
        self.model.check_image_generation(prompt_embeds.shape[1], height, width, num_iter, guidance_scale,
                                          guidance_schedule, temperature, num_inference_steps,
                                          generator)  # before any compute

        # 3. Prepare the tokens to keep (inpainting)
        image_latents = token_mask = None
        if image is not None:
            image_latents, token_mask = self.prepare_inpainting(image, mask_image, height, width, batch)

        # 4. Masked-autoregressive rounds: the model's sampling loop, with this pipeline's scheduler and callbacks
        grid_size = (height // self.model.config.vae_stride, width // self.model.config.vae_stride)
        to_generate = grid_size[0] * grid_size[1] if token_mask is None else int(token_mask[0].sum())
        self._num_timesteps = preset.num_rounds(num_iter, to_generate)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:

            def after_round(round_index, num_masked, tokens):
                progress_bar.update()
                if callback_on_step_end is None:
                    return None
                latents_now = tokens.reshape(tokens.shape[0], *grid_size, -1)
                tensors = {"latents": latents_now} if "latents" in callback_on_step_end_tensor_inputs else {}
                replaced = (callback_on_step_end(self, round_index, num_masked, tensors) or {}).get("latents")
                return None if replaced is None or replaced is latents_now else replaced.reshape(tokens.shape)

            # latents (b, h, w, c), or the VAE's pixels (b, 3, H, W)
            generated = self.model.generate_images(
                attention_mask=prompt_attention_mask, inputs_embeds=prompt_embeds, height=height, width=width,
                num_iter=num_iter, guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                temperature=temperature, num_inference_steps=num_inference_steps, generator=generator,
                image_latents=image_latents, mask=token_mask, scheduler=self.scheduler, callback=after_round,
                should_stop=lambda: self.interrupt, output_type="latent" if output_type == "latent" else "pt",
                preset=preset, noise=latents,
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


def _stack_right_padded(embeds: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings (b_i, L_i, d) and masks (b_i, L_i) of several lengths -> one right-padded batch; the padding
    is masked, so its values do not matter."""
    length = max(embed.shape[1] for embed in embeds)
    padded = [torch.nn.functional.pad(embed, (0, 0, 0, length - embed.shape[1])) for embed in embeds]
    padded_masks = [torch.nn.functional.pad(mask, (0, length - mask.shape[1])) for mask in masks]
    return torch.cat(padded), torch.cat(padded_masks)


def _has_file(source: str, filename: str, hub: dict) -> bool:
    """Whether the folder or Hub repository `source` (at the requested revision) has `filename`; offline, whether
    the cached snapshot has it."""
    found = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **hub)
    return found is not None


def _load_scheduler(source: str, model, hub: dict):
    """The scheduler of `source`'s `scheduler/`: Harmon's own, or the diffusers scheduler its config names."""
    scheduler_class = type(model.model.diffusion_head.noise_scheduler)
    config = scheduler_class.load_config(source, subfolder="scheduler", **hub)
    name = config.get("_class_name")
    if name == scheduler_class.__name__:
        return scheduler_class.from_config(config)
    if isinstance(name, str) and name.endswith("Scheduler") and hasattr(diffusers, name):
        return getattr(diffusers, name).from_config(config)
    raise ValueError(f"{source}/scheduler: _class_name must name a diffusers scheduler or "
                     f"{scheduler_class.__name__}, got {name!r}")
