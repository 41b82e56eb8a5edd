"""Choosing and loading the model for the entry points (the `harmon` command and the demo): one place for the
order --model, $HARMON_MODEL, the bundled Harmon-Shapes, and for the errors a user's model argument can cause."""

import os

from . import bundled_model


MODEL_ENVIRONMENT_VARIABLE = "HARMON_MODEL"


def choose_model(name: str | None) -> str:
    """`name` if given, else $HARMON_MODEL, else the bundled model if it is installed."""
    if name:
        return name
    if os.environ.get(MODEL_ENVIRONMENT_VARIABLE):
        return os.environ[MODEL_ENVIRONMENT_VARIABLE]
    bundled = bundled_model.bundled_model_path()
    if bundled is None:
        raise ValueError(f"no model given: pass --model PATH_OR_HUB_ID or set {MODEL_ENVIRONMENT_VARIABLE}")
    return str(bundled)


def load_pipeline(name: str | None, lora: str | None = None):
    """The `HarmonPipeline` of the chosen model (float32; on the GPU if there is one), with the LoRA adapter folder
    `lora` merged in. A model that cannot be found or read is a `ValueError` whose message is one line."""
    import torch
    from transformers.utils import logging as transformers_logging

    from .pipeline_harmon import HarmonPipeline
    from .user_input import first_line, is_missing_folder

    name = choose_model(name)
    transformers_logging.disable_progress_bar()  # loading is quick; keep stderr for progress of real work and errors
    if is_missing_folder(name):
        raise ValueError(f"no such model folder: {name}")
    try:
        pipeline = HarmonPipeline.from_pretrained(name, dtype=torch.float32)
    except Exception as error:  # any failure to resolve or read a model is the user's model argument
        raise ValueError(f"cannot load model {name!r}: {first_line(error)}") from error
    if lora is not None:
        from .training import load_with_adapter

        pipeline.register_modules(model=load_with_adapter(pipeline.model, lora))
    if torch.cuda.is_available():
        pipeline.to("cuda")
    return pipeline
