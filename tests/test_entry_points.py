"""Through transformers' and diffusers' own doors: the auto classes and pipeline("image-text-to-text") with
chat-format input, DiffusionPipeline on a pipeline folder, Hub repositories through huggingface_hub's cache; with
harmon_hf installed and as remote code without it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoModelForMultimodalLM, pipeline

from conftest import WITHOUT_HARMON_HF, hub_cache_repository
from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.answering import answer, image_question


QUESTION = "What colour is the shape?"


def _chat(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def red_image():
    return Image.new("RGB", (64, 64), (220, 30, 30))


def test_the_auto_classes_for_image_text_to_text_give_harmon(harmon_folder):
    for auto_class in (AutoModelForImageTextToText, AutoModelForMultimodalLM):
        assert type(auto_class.from_pretrained(harmon_folder)) is HarmonForConditionalGeneration
    auto_map = json.loads((harmon_folder / "config.json").read_text())["auto_map"]
    for name in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM"):
        assert auto_map[name] == "modeling_harmon.HarmonForConditionalGeneration", name


def test_apply_chat_template_returns_model_inputs(pipe, red_image):
    inputs = pipe.processor.apply_chat_template(_chat(red_image), tokenize=True, return_dict=True,
                                                add_generation_prompt=True, return_tensors="pt")
    text = pipe.processor.apply_chat_template([image_question(QUESTION)], add_generation_prompt=True)
    expected = pipe.processor(text=text, images=[red_image])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])


def test_post_processing_strips_the_chat_markup_and_decode_does_not(pipe):
    processor = pipe.processor
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = processor.tokenizer(prompt + "A red circle.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert processor.post_process_image_text_to_text([ids]) == ["A red circle."]
    assert processor.decode(ids) == processor.tokenizer.decode(ids)
    assert processor.batch_decode([ids]) == processor.tokenizer.batch_decode([ids])


def test_the_image_text_to_text_pipeline_answers_a_chat(pipe, harmon_folder, red_image):
    expected = answer(pipe, [image_question(QUESTION)], [red_image], max_new_tokens=6)
    chat = pipeline("image-text-to-text", model=str(harmon_folder))
    output = chat(text=_chat(red_image), max_new_tokens=6, return_full_text=False)
    assert output[0]["generated_text"] == expected


REMOTE_PIPELINE_SCRIPT = WITHOUT_HARMON_HF + textwrap.dedent(
    """
    from PIL import Image
    from transformers import pipeline

    chat = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
    assert "harmon_hf" not in sys.modules
    image = Image.new("RGB", (64, 64), (220, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": sys.argv[2]}]}]
    print("ANSWER:" + chat(text=messages, max_new_tokens=6, return_full_text=False)[0]["generated_text"])
    """
)


def test_the_pipeline_answers_as_remote_code_without_harmon_hf(pipe, harmon_folder, red_image, tmp_path):
    script = tmp_path / "remote_pipeline.py"
    script.write_text(REMOTE_PIPELINE_SCRIPT)
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(harmon_folder), QUESTION], capture_output=True,
                            text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = answer(pipe, [image_question(QUESTION)], [red_image], max_new_tokens=6)
    assert result.stdout.split("ANSWER:", 1)[1].rstrip("\n") == expected


def test_the_pipeline_follows_diffusers_conventions(pipe, harmon_folder):
    """`dtype=` as both libraries spell it now, the scheduler among the components, the call's guidance."""
    from harmon_hf import HarmonPipeline

    assert HarmonPipeline.from_pretrained(harmon_folder, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert HarmonPipeline.from_pretrained(harmon_folder, torch_dtype=torch.bfloat16).model.dtype == torch.bfloat16
    assert set(pipe.components) == {"model", "processor", "scheduler"}
    assert HarmonPipeline(**pipe.components).scheduler is pipe.scheduler
    pipe("a red circle", guidance_scale=2.5, num_iter=2, num_inference_steps=2, output_type="latent")
    assert pipe.guidance_scale == 2.5 and pipe.do_classifier_free_guidance
    pipe("a red circle", guidance_scale=1.0, num_iter=2, num_inference_steps=2, output_type="latent")
    assert not pipe.do_classifier_free_guidance


def test_answers_end_where_the_generation_config_says(pipe, harmon_folder, red_image, monkeypatch):
    """The converter writes the chat's end tokens into generation_config, and answering stops where it says (no
    stop list of its own)."""
    end_ids = pipe.processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert json.loads((harmon_folder / "generation_config.json").read_text())["eos_token_id"] == end_ids
    assert pipe.processor.end_token_ids == end_ids
    calls = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    answer(pipe, [image_question(QUESTION)], [red_image], max_new_tokens=6)
    assert len(calls) == 1 and "eos_token_id" not in calls[0]


def test_the_bundled_model_ends_answers_at_the_chat_end_tokens():
    from harmon_hf import BUNDLED_MODEL, HarmonPipeline

    bundled = HarmonPipeline.from_pretrained(BUNDLED_MODEL)
    saved = json.loads((BUNDLED_MODEL / "generation_config.json").read_text())["eos_token_id"]
    assert saved == bundled.processor.end_token_ids == bundled.model.generation_config.eos_token_id


HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from harmon_hf import HarmonPipeline

    for revision in (None, sys.argv[2]):
        pipe = HarmonPipeline.from_pretrained(sys.argv[1], revision=revision)
        print("LOADED:" + json.dumps([revision, type(pipe.scheduler).__name__,
                                     pipe.model.image_generation_defaults["num_iter"]]))
    """
)


def test_a_hub_repository_gives_each_revision_with_its_own_scheduler(pipe, harmon_folder, tmp_path, monkeypatch):
    """Through huggingface_hub's cache, offline: `main` is the model folder without scheduler/, an older revision
    the same model with a DPM-Solver scheduler/ and 3 rounds by default; `revision` must reach every part."""
    import shutil

    from diffusers import DPMSolverMultistepScheduler

    shutil.copytree(harmon_folder, tmp_path / "old")
    monkeypatch.setitem(pipe.model.generation_config.image_generation, "num_iter", 3)
    pipe.model.generation_config.save_pretrained(tmp_path / "old")
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, variance_type=None).save_pretrained(
        tmp_path / "old" / "scheduler")
    commits = hub_cache_repository(tmp_path / "cache", "harmon/tiny", {"old": tmp_path / "old", "main": harmon_folder})
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "harmon/tiny", commits["old"]], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"),
                                                          "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = [json.loads(line.split("LOADED:", 1)[1]) for line in result.stdout.splitlines() if "LOADED:" in line]
    assert loaded == [[None, "HarmonDiffusionScheduler", 64],
                      [commits["old"], "DPMSolverMultistepScheduler", 3]]
