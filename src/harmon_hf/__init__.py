"""harmon-hf: Harmon (unified multimodal understanding and generation) for the Hugging Face ecosystem.

`import harmon_hf` is light: each name below is imported where it is first used (so that the `harmon` command
answers `--help` and argument errors without loading torch), and loading Harmon's model code registers it with
transformers' Auto classes.
"""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Each public name -> the submodule that defines it.
_SUBMODULE_OF = {
    "HarmonConfig": "modeling",
    "HarmonDiffusionScheduler": "modeling",
    "HarmonForConditionalGeneration": "modeling",
    "HarmonImageProcessor": "modeling",
    "HarmonModel": "modeling",
    "HarmonPreTrainedModel": "modeling",
    "HarmonProcessor": "modeling",
    "HarmonSamplingPreset": "modeling",
    "SAMPLING_PRESETS": "modeling",
    "HarmonPipeline": "modeling",
    "HarmonPipelineOutput": "modeling",
    "BUNDLED_MODEL": "bundled_model",
    "bundled_model_path": "bundled_model",
    "processor_for": "convert",
}

__all__ = sorted(_SUBMODULE_OF)

if TYPE_CHECKING:
    from .bundled_model import BUNDLED_MODEL, bundled_model_path
    from .convert import processor_for
    from .modeling import (SAMPLING_PRESETS, HarmonConfig, HarmonDiffusionScheduler, HarmonForConditionalGeneration,
                           HarmonImageProcessor, HarmonModel, HarmonPipeline, HarmonPipelineOutput,
                           HarmonPreTrainedModel, HarmonProcessor, HarmonSamplingPreset)


def __getattr__(name: str):
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULE_OF})
