"""harmon-hf: Harmon (unified multimodal understanding and generation) for the Hugging Face ecosystem."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .bundled_model import BUNDLED_MODEL, bundled_model_path
from .modeling import (
    SAMPLING_PRESETS,
    HarmonConfig,
    HarmonDiffusionScheduler,
    HarmonForConditionalGeneration,
    HarmonImageProcessor,
    HarmonModel,
    HarmonPreTrainedModel,
    HarmonProcessor,
    HarmonSamplingPreset,
)


AutoConfig.register(HarmonConfig.model_type, HarmonConfig, exist_ok=True)
for auto_model in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
    auto_model.register(HarmonConfig, HarmonForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(HarmonConfig, slow_image_processor_class=HarmonImageProcessor, exist_ok=True)
AutoProcessor.register(HarmonConfig, HarmonProcessor, exist_ok=True)
# Saved folders carry the modeling files and load with `trust_remote_code=True` where harmon_hf is not installed.
HarmonConfig.register_for_auto_class()
HarmonForConditionalGeneration.register_for_auto_class("AutoModel")
HarmonImageProcessor.register_for_auto_class("AutoImageProcessor")
HarmonProcessor.register_for_auto_class("AutoProcessor")


def processor_for(config: HarmonConfig, tokenizer) -> HarmonProcessor:
    """The processor matching a model's configuration, around a tokenizer that knows `<image>`."""
    image_processor = HarmonImageProcessor(image_size=config.image_size, vae_stride=config.vae_stride)
    return HarmonProcessor(image_processor=image_processor, tokenizer=tokenizer, num_buffer_tokens=config.buffer_size)


from .pipeline_harmon import HarmonPipeline, HarmonPipelineOutput  # noqa: E402  (needs the registrations above)

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODEL",
    "HarmonConfig",
    "HarmonDiffusionScheduler",
    "HarmonForConditionalGeneration",
    "HarmonImageProcessor",
    "HarmonModel",
    "HarmonPipeline",
    "HarmonPipelineOutput",
    "HarmonPreTrainedModel",
    "HarmonProcessor",
    "HarmonSamplingPreset",
    "SAMPLING_PRESETS",
    "bundled_model_path",
    "processor_for",
]
