"""Quantization through transformers' `quantization_config`: torchao's int8 schemes on the CPU quantize the linear
layers of the LLM, the MAR encoder and decoder, the projections and the diffusion head, never the VAE's
(`_keep_in_fp32_modules`); and nothing in the model stands in the way of bitsandbytes' integer weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
from torchao.utils import get_model_size_in_bytes
from transformers import TorchAoConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from harmon_hf import HarmonPipeline
from harmon_hf.answering import answer
from test_precision import QUESTION, question_inputs, red_square


SCHEMES = {"int8-weight-only": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig}
SETTINGS = dict(num_iter=4, num_inference_steps=10)


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def _linears(model) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.fixture(scope="module")
def float32_pipe(harmon_folder):
    pipe = HarmonPipeline.from_pretrained(harmon_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_torchao_int8_model_generates_and_answers_in_less_memory(harmon_folder, float32_pipe, scheme):
    pipe = HarmonPipeline.from_pretrained(harmon_folder, quantization_config=TorchAoConfig(scheme()))
    pipe.set_progress_bar_config(disable=True)
    model = pipe.model

    # Every linear layer is int8 but the VAE's (the tiny VAE has attention layers) and the LM head, which transformers
    # leaves as it is because it shares its weight with the input embeddings.
    linears = _linears(model)
    quantized = {name for name, linear in linears.items() if is_traceable_wrapper_subclass(linear.weight)}
    vae = {name for name in linears if name.startswith("model.vae.")}
    assert vae and set(linears) - quantized == vae | {"lm_head"}
    assert all(linears[name].weight.qdata.dtype == torch.int8 for name in quantized)

    # Memory as stored (int8 data and float32 scales), where `get_memory_footprint` counts a torchao weight at the size
    # of the float dtype it stands for and finds no saving: the weights quantized to int8 take about a quarter of their
    # float32 bytes.
    reference_linears = _linears(float32_pipe.model)
    float32_weight_bytes = sum(reference_linears[name].weight.nbytes for name in quantized)
    saved = get_model_size_in_bytes(float32_pipe.model) - get_model_size_in_bytes(model)
    assert 0.6 * float32_weight_bytes < saved < 0.75 * float32_weight_bytes

    images = pipe("a red circle", generator=_seed(), output_type="pt", **SETTINGS).images
    size = model.config.image_size
    assert images.shape == (1, 3, size, size) and images.dtype == torch.uint8
    latents = pipe("a red circle", generator=_seed(), output_type="latent", **SETTINGS).images
    reference_latents = float32_pipe("a red circle", generator=_seed(), output_type="latent", **SETTINGS).images
    assert torch.isfinite(latents).all() and latents.shape == reference_latents.shape

    inputs = question_inputs(pipe.processor, size)
    with torch.no_grad():
        logits, reference_logits = model(**inputs).logits, float32_pipe.model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert (logits - reference_logits).abs().max() < 0.2 * reference_logits.abs().max()
    assert answer(pipe, QUESTION, [red_square(size)], max_new_tokens=8) == answer(float32_pipe, QUESTION,
                                                                                  [red_square(size)], max_new_tokens=8)


@pytest.mark.parametrize("model_name", ["HarmonForConditionalGeneration", "HarmonModel"])
def test_quantizers_skip_the_vae_by_module_name(tiny_model, model_name):
    """bitsandbytes (as torchao, by parameter name) picks the linear layers to replace by matching their paths against
    its skip list and `_keep_in_fp32_modules`: the VAE's, in the full model and in the base model alone."""
    model = tiny_model if model_name == "HarmonForConditionalGeneration" else tiny_model.model
    vae_prefix = "model.vae." if model is tiny_model else "vae."
    for name in _linears(model):
        assert should_convert_module(name, model._keep_in_fp32_modules) == (not name.startswith(vae_prefix)), name


class Int8StoredLinear(nn.Linear):
    """A linear layer as bitsandbytes' Linear8bitLt shows it: an int8 weight, floating-point inputs and outputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, device="meta")
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        self.weight = nn.Parameter((weight / scale).round().to(torch.int8), requires_grad=False)
        self.bias = linear.bias
        self.register_buffer("scale", scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_floating_point():
            raise TypeError(f"a linear layer got {hidden_states.dtype} inputs")
        return F.linear(hidden_states, (self.weight * self.scale).to(hidden_states.dtype), self.bias)


def test_integer_weights_do_not_set_the_dtype_of_inputs(harmon_folder, float32_pipe):
    """The MAR encoder and the diffusion head cast their float32 inputs (latent tokens, timesteps) to the dtype they
    compute in, not to their first linear layer's weight dtype, which bitsandbytes makes int8."""
    pipe = HarmonPipeline.from_pretrained(harmon_folder)
    pipe.set_progress_bar_config(disable=True)
    for name, linear in _linears(pipe.model.model).items():
        if not name.startswith("vae."):
            parent, _, child = name.rpartition(".")
            setattr(pipe.model.model.get_submodule(parent), child, Int8StoredLinear(linear))
    assert pipe.model.model.mar_encoder.token_proj.weight.dtype == torch.int8

    latents = pipe("a red circle", generator=_seed(), output_type="latent", **SETTINGS).images
    reference = float32_pipe("a red circle", generator=_seed(), output_type="latent", **SETTINGS).images
    assert torch.isfinite(latents).all() and latents.shape == reference.shape
    with torch.no_grad():
        assert torch.isfinite(pipe.model(**question_inputs(pipe.processor, pipe.model.config.image_size)).logits).all()
