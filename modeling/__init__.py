"""Harmon's model code. These files are self-contained so that they can sit in a Hub repository as remote code."""

from .configuration_harmon import HarmonConfig
from .image_processing_harmon import HarmonImageProcessor
from .modeling_harmon import (
    SAMPLING_PRESETS,
    HarmonForConditionalGeneration,
    HarmonModel,
    HarmonPreTrainedModel,
    HarmonSamplingPreset,
)
from .processing_harmon import HarmonProcessor
from .scheduling_harmon import HarmonDiffusionScheduler


__all__ = [
    "HarmonConfig",
    "HarmonDiffusionScheduler",
    "HarmonForConditionalGeneration",
    "HarmonImageProcessor",
    "HarmonModel",
    "HarmonPreTrainedModel",
    "HarmonProcessor",
    "HarmonSamplingPreset",
    "SAMPLING_PRESETS",
]
