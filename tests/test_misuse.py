"""Misuse and broken inputs get one clear ValueError, naming the field, the value and the rule, before the work they
would spoil: broken weights and configs at load, non-finite generations, and wrong arguments to the Python API."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, PreTrainedModel

from harmon_hf import HarmonConfig, HarmonForConditionalGeneration, HarmonModel, HarmonPipeline
from harmon_hf.answering import answer, answers, image_question


NAN_TENSOR = "model.diffusion_head.final_layer.linear.bias"
INF_TENSOR = "model.mar_decoder.mask_token"


def _copy_with(folder, destination, config=None, generation_config=None):
    """A copy of the model folder `folder` with entries of config.json / generation_config.json replaced."""
    shutil.copytree(folder, destination)
    for name, entries in (("config.json", config), ("generation_config.json", generation_config)):
        if entries:
            path = destination / name
            path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))
    return destination


@pytest.fixture(scope="module")
def nonfinite_folder(harmon_folder, tmp_path_factory):
    """The tiny model's folder with NaN in one tensor and inf in another, as a diverged run leaves them."""
    folder = _copy_with(harmon_folder, tmp_path_factory.mktemp("nonfinite") / "model")
    tensors = load_file(folder / "model.safetensors")
    tensors[NAN_TENSOR][0] = float("nan")
    tensors[INF_TENSOR][..., 0] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _with_nan(pipe, parameter: str) -> HarmonPipeline:
    """A pipeline around a copy of `pipe`'s model whose `parameter` is all NaN."""
    model = copy.deepcopy(pipe.model)
    with torch.no_grad():
        model.get_parameter(parameter).fill_(float("nan"))
    pipeline = HarmonPipeline(model=model, processor=pipe.processor)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("load", [HarmonForConditionalGeneration.from_pretrained, AutoModel.from_pretrained,
                                  HarmonPipeline.from_pretrained], ids=["harmon-class", "auto-class", "pipeline"])
def test_weights_holding_nan_or_inf_are_refused_at_load_by_name(nonfinite_folder, load):
    with pytest.raises(ValueError) as refused:
        load(nonfinite_folder)
    message = str(refused.value)
    assert message.startswith("2 weight tensor(s) hold NaN or inf values (") and "\n" not in message
    assert NAN_TENSOR in message and INF_TENSOR in message and "allow_nonfinite_weights=True" in message


def test_the_base_model_refuses_non_finite_weights_under_its_own_names(nonfinite_folder):
    with pytest.raises(ValueError, match=r"2 weight tensor\(s\) .*\(mar_decoder\.mask_token, diffusion_head"):
        HarmonModel.from_pretrained(nonfinite_folder)


def test_allow_nonfinite_weights_loads_them_as_they_are(nonfinite_folder):
    model = HarmonForConditionalGeneration.from_pretrained(nonfinite_folder, allow_nonfinite_weights=True)
    assert model.get_parameter(NAN_TENSOR)[0].isnan() and model.get_parameter(INF_TENSOR)[..., 0].isinf().all()
    pipeline = HarmonPipeline.from_pretrained(nonfinite_folder, allow_nonfinite_weights=True)
    assert pipeline.model.get_parameter(NAN_TENSOR)[0].isnan()


@pytest.mark.parametrize(
    "parameter, message",
    [
        ("model.diffusion_head.final_layer.linear.bias", r"NaN or inf latents in round 1 of 2: the model's weights"),
        ("model.vae.decoder.conv_out.bias", r"NaN or inf pixels in the VAE's decoding: the model's weights"),
    ],
)
def test_an_image_generation_that_goes_non_finite_raises_instead_of_giving_a_black_image(pipe, parameter, message):
    broken = _with_nan(pipe, parameter)
    with pytest.raises(ValueError, match=message):
        broken("a red circle", num_iter=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_an_answer_from_nan_logits_raises_instead_of_being_exclamation_marks(pipe):
    broken = _with_nan(pipe, "model.language_model.norm.weight")
    with pytest.raises(ValueError, match="text generation produced NaN or inf logits"):
        answer(broken, [image_question("What colour is it?")], [Image.new("RGB", (64, 64))], max_new_tokens=4)


def test_a_config_key_that_harmon_computes_is_refused_in_one_line(harmon_folder, tmp_path):
    folder = _copy_with(harmon_folder, tmp_path / "model", config={"vae_stride": 16})
    expected = "vae_stride=16 in the config is not a setting: HarmonConfig computes vae_stride from its other fields"
    for load in (HarmonConfig.from_pretrained, HarmonPipeline.from_pretrained):
        with pytest.raises(ValueError, match=expected):
            load(folder)


def test_a_folder_of_another_model_type_is_refused_before_any_model_is_built(harmon_folder, tmp_path, monkeypatch):
    folder = _copy_with(harmon_folder, tmp_path / "model", config={"model_type": "llama"})
    # Today's AutoModel would build a Llama of the default size (gigabytes), not fail.
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *args, **kwargs: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match=f"{folder}: model_type is 'llama', but a Harmon model's must be 'harmon'"):
        HarmonPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="model_type is 'llama', but a Harmon config's must be 'harmon'"):
        HarmonForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"guidance_scale": float("nan")}, "the generation config's guidance_scale must be a finite number, got nan"),
        ({"temperature": float("inf")}, "the generation config's temperature must be a finite number, got inf"),
        ({"image_generation": {"guidance_scale": float("nan")}},
         "the generation config's image_generation: guidance_scale must be a finite number, got nan"),
        ({"image_generation": {"num_iter": 0}},
         "the generation config's image_generation: num_iter must be a positive integer, got 0"),
        ({"image_generation": {"num_iters": 8}},
         "the generation config's image_generation: unknown image generation setting 'num_iters'"),
    ],
)
def test_generation_config_numbers_outside_the_rules_are_refused_before_the_weights_load(
    harmon_folder, tmp_path, monkeypatch, entries, message
):
    folder = _copy_with(harmon_folder, tmp_path / "model", generation_config=entries)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained",
                        classmethod(lambda *args, **kwargs: pytest.fail("the weights were loaded")))
    with pytest.raises(ValueError, match=re.escape(message)):
        HarmonPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(negative_prompt=5), "negative_prompt must be a string or a list of strings, got 5"),
        (dict(prompt=None), r"give a prompt \(or prompt_embeds\): got neither"),
        (dict(generator="abc"), r"generator must be a torch.Generator or a list of them \(one per image\), got 'abc'"),
        (dict(generator=[torch.Generator(), 7]), r"generator must be a torch.Generator .*, got 7 in the list"),
        (dict(image=np.zeros((64, 64, 3), np.uint8), mask_image=Image.new("L", (64, 64), 255)),
         r"image must be a PIL image \(PIL.Image.Image\), got ndarray"),
        (dict(image=Image.new("RGB", (64, 64)), mask_image=np.ones((64, 64), np.uint8)),
         r"mask_image must be a PIL image \(PIL.Image.Image\), got ndarray"),
    ],
)
def test_pipeline_arguments_of_the_wrong_kind_are_refused_by_name(pipe, arguments, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "a red circle", "num_iter": 2, "num_inference_steps": 2, **arguments})


@pytest.mark.parametrize("side", ["left", "top", "right", "bottom"])
def test_outpainting_refuses_a_negative_margin_instead_of_cropping(side):
    with pytest.raises(ValueError, match=f"{side} must be a number of pixels >= 0 to add, got -10"):
        HarmonPipeline.prepare_outpainting(Image.new("RGB", (64, 64)), **{side: -10})


def test_an_empty_batch_of_conversations_or_texts_is_refused(pipe):
    with pytest.raises(ValueError, match="conversations must hold at least one conversation, got an empty list"):
        answers(pipe, [], [], max_new_tokens=4)
    with pytest.raises(ValueError, match="text must hold at least one sequence, got an empty list"):
        pipe.processor(text=[])


@pytest.mark.parametrize(
    "messages",
    [
        [image_question("What is <image> here?")],
        [image_question("Colour?"), {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "<image>?"}],
    ],
)
def test_a_literal_image_marker_in_a_question_says_how_images_are_given(pipe, messages):
    expected = (r"a user message's text holds a literal <image> marker; images are given as \{'type': 'image'\} "
                r"parts, and the text must not contain <image>")
    with pytest.raises(ValueError, match=expected):
        answer(pipe, messages, [Image.new("RGB", (64, 64))], max_new_tokens=4)
