"""harmon-hf: Harmon (unified multimodal understanding and generation) for the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    HarmonConfig,
    HarmonDiffusionScheduler,
    HarmonForConditionalGeneration,
    HarmonModel,
    HarmonPreTrainedModel,
)


AutoConfig.register(HarmonConfig.model_type, HarmonConfig, exist_ok=True)
AutoModel.register(HarmonConfig, HarmonForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(HarmonConfig, HarmonForConditionalGeneration, exist_ok=True)
# Saved folders carry the modeling files and load with `trust_remote_code=True` where harmon_hf is not installed.
HarmonConfig.register_for_auto_class()
HarmonForConditionalGeneration.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

__all__ = [
    "HarmonConfig",
    "HarmonDiffusionScheduler",
    "HarmonForConditionalGeneration",
    "HarmonModel",
    "HarmonPreTrainedModel",
]
