"""Harmon's model code and its diffusers pipeline, installed as `harmon_hf.modeling`. The files beside this one are
self-contained so that they can sit in a Hub repository as remote code; this package file, which is not shipped,
registers them with transformers' Auto classes when harmon_hf's model code is first imported."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_harmon import HarmonConfig
from .image_processing_harmon import HarmonImageProcessor
from .modeling_harmon import (
    SAMPLING_PRESETS,
    HarmonForConditionalGeneration,
    HarmonModel,
    HarmonPreTrainedModel,
    HarmonSamplingPreset,
)
from .pipeline_harmon import HarmonPipeline, HarmonPipelineOutput
from .processing_harmon import HarmonProcessor
from .scheduling_harmon import HarmonDiffusionScheduler


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


__all__ = [
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
]
