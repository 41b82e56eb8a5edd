"""Half precision: loaded in float16 or bfloat16, Harmon computes in that dtype, except the VAE, which float16 keeps in
float32 (`_keep_in_fp32_modules`); float16 generation and understanding stay finite and close to float32."""

from collections import defaultdict

import pytest
import torch
from PIL import Image

from harmon_hf import BUNDLED_MODEL, HarmonForConditionalGeneration, HarmonPipeline
from harmon_hf.answering import image_question


SETTINGS = dict(num_iter=8, num_inference_steps=20)
QUESTION = [image_question("What shape is this?")]


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def red_square(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    image.paste((200, 30, 30), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def question_inputs(processor, size: int):
    """The processor's inputs for QUESTION about a red square."""
    return processor(text=processor.apply_chat_template(QUESTION, add_generation_prompt=True),
                     images=[red_square(size)])


def _record_dtypes(model, module_types) -> dict:
    """Forward hooks on every module of `module_types`: name -> set of (input dtype, output dtype) seen."""
    seen = defaultdict(set)
    for name, module in model.named_modules():
        if isinstance(module, module_types):
            module.register_forward_hook(
                lambda module, inputs, output, name=name: seen[name].add((inputs[0].dtype, output.dtype))
            )
    return seen


@pytest.fixture(scope="module")
def bundled_pipelines():
    """Harmon-Shapes, a trained model, in float32 and in float16."""
    pipelines = {}
    for dtype in (torch.float32, torch.float16):
        pipelines[dtype] = HarmonPipeline.from_pretrained(BUNDLED_MODEL, dtype=dtype)
        pipelines[dtype].set_progress_bar_config(disable=True)
    return pipelines


def test_float16_generation_is_finite_and_matches_float32(bundled_pipelines):
    images = {dtype: pipe("a red circle", generator=_seed(), output_type="pt", **SETTINGS).images
              for dtype, pipe in bundled_pipelines.items()}
    latents = bundled_pipelines[torch.float16]("a red circle", generator=_seed(), output_type="latent",
                                                **SETTINGS).images
    assert torch.isfinite(latents).all()
    assert images[torch.float16].dtype == torch.uint8 and images[torch.float16].shape == images[torch.float32].shape
    # NaN pixels would not survive this: the same seed gives the same image, to a level or two of 255.
    difference = (images[torch.float16].int() - images[torch.float32].int()).abs()
    assert difference.max() <= 3 and difference.float().mean() < 0.5, (difference.max(), difference.float().mean())


def test_float16_understanding_is_finite_and_matches_float32(bundled_pipelines):
    processor = bundled_pipelines[torch.float32].processor
    inputs = question_inputs(processor, bundled_pipelines[torch.float32].model.config.image_size)
    with torch.no_grad():
        logits = {dtype: pipe.model(**inputs).logits for dtype, pipe in bundled_pipelines.items()}
    assert logits[torch.float16].dtype == torch.float16 and torch.isfinite(logits[torch.float16]).all()
    reference = logits[torch.float32]
    assert (logits[torch.float16].float() - reference).abs().max() < 0.01 * reference.abs().max()
    assert torch.equal(logits[torch.float16][0, -1].argmax(), reference[0, -1].argmax())


@pytest.mark.parametrize("dtype, vae_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_half_precision_computes_in_it_and_float16_keeps_the_vae_in_float32(harmon_folder, dtype, vae_dtype):
    """Every linear layer of the LLM, the MAR encoder and decoder, the projections and the diffusion head takes and
    gives `dtype` in understanding and in generation (not float32 through some upcast); the VAE's convolutions run in
    float32 under float16 only."""
    pipe = HarmonPipeline.from_pretrained(harmon_folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.model
    assert {parameter.dtype for parameter in model.model.vae.parameters()} == {vae_dtype}
    assert {parameter.dtype for name, parameter in model.named_parameters() if ".vae." not in name} == {dtype}
    linears = _record_dtypes(model, torch.nn.Linear)
    convolutions = _record_dtypes(model.model.vae, torch.nn.Conv2d)

    with torch.no_grad():
        model(**question_inputs(pipe.processor, model.config.image_size))
    # One round runs every network; the tiny model's random weights sample tokens near float16's largest value, which
    # a second round's encoder would overflow to NaN (refused).
    latents = pipe("a red circle", generator=_seed(), output_type="latent", num_iter=1, num_inference_steps=2).images
    pixels = model.decode_latents(latents)

    expected = {name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not name.startswith("model.vae.")}
    assert expected <= set(linears), f"never ran: {sorted(expected - set(linears))}"
    assert {name: pairs for name, pairs in linears.items() if name in expected and pairs != {(dtype, dtype)}} == {}
    assert convolutions and all(pairs == {(vae_dtype, vae_dtype)} for pairs in convolutions.values())
    assert pixels.dtype == vae_dtype  # not finite: the tiny model's random weights sample beyond float16's range


def test_float16_decodes_latents_beyond_its_range(harmon_folder):
    """The sampler's tokens are float32 and unbounded; divided by `vae_scale` they can pass float16's largest value
    (65504), and the VAE decodes them in float32."""
    model = HarmonForConditionalGeneration.from_pretrained(harmon_folder, dtype=torch.float16).eval()
    config = model.config
    grid = config.image_size // config.vae_stride
    largest = torch.finfo(torch.float16).max
    latents = torch.full((1, grid, grid, config.token_channels), 2.0 * largest * config.vae_scale)
    assert torch.isinf((latents / config.vae_scale).half()).all()
    assert torch.isfinite(model.decode_latents(latents)).all()
