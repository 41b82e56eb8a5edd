"""Choosing and loading the model for the entry points (the `harmon` command and the demo): one place for the
order --model, $HARMON_MODEL, the bundled Harmon-Shapes, and for the errors a user's model argument can cause."""

import os

from . import bundled_model


MODEL_ENVIRONMENT_VARIABLE = "HARMON_MODEL"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")


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


def choose_device(name: str = "auto"):
    """`name`, or for "auto" the GPU if there is one (CUDA, else Apple's MPS), else the CPU."""
    import torch

    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: this machine has no CUDA GPU that torch can use")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps: this machine has no Apple GPU that torch can use")
    return torch.device(name)


def choose_dtype(name: str, device):
    """`name`, or for "auto" bfloat16 where `device` computes it natively (GPUs that support it, CPUs with
    AVX512-BF16 or AMX) and float32 elsewhere."""
    import torch

    from .modeling.modeling_harmon import computes_bfloat16_natively

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if computes_bfloat16_natively(device) else torch.float32
    return getattr(torch, name)


def load_pipeline(name: str | None, lora: str | None = None, dtype: str = "float32", device: str = "auto"):
    """The `HarmonPipeline` of the chosen model in `dtype` on `device` (see `choose_dtype`, `choose_device`), with
    the LoRA adapter folder `lora` merged in. A model that cannot be found or read is a `ValueError` whose message is
    one line."""
    from transformers.utils import logging as transformers_logging

    from .modeling import HarmonPipeline
    from .user_input import first_line, is_missing_folder

    name = choose_model(name)
    device = choose_device(device)
    dtype = choose_dtype(dtype, device)
    transformers_logging.disable_progress_bar()  # loading is quick; keep stderr for progress of real work and errors
    if is_missing_folder(name):
        raise ValueError(f"no such model folder: {name}")
    try:
        pipeline = HarmonPipeline.from_pretrained(name, dtype=dtype)
    except Exception as error:  # any failure to resolve or read a model is the user's model argument
        raise ValueError(f"cannot load model {name!r}: {first_line(error)}") from error
    if lora is not None:
        from .training import load_with_adapter

        pipeline.register_modules(model=load_with_adapter(pipeline.model, lora))
    return pipeline.to(device)
