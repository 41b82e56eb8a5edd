"""Training Harmon: recipes, streamed data, HarmonTrainer and LoRA."""

from .data import HarmonDataCollator, build_training_stream
from .lora import export_merged, load_with_adapter
from .recipe import DataSource, LoraSettings, Recipe
from .run import train
from .trainer import HarmonTrainer, parameter_groups


__all__ = [
    "DataSource",
    "HarmonDataCollator",
    "HarmonTrainer",
    "LoraSettings",
    "Recipe",
    "build_training_stream",
    "export_merged",
    "load_with_adapter",
    "parameter_groups",
    "train",
]
