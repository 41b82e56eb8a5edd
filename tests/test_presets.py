"""Sampling presets: `reference` is the reference sampler, and each technique of `fast` and `fastest` does what its
field says, alone, through the one sampling loop."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_harmon
from harmon_hf import SAMPLING_PRESETS, HarmonSamplingPreset
from harmon_hf.modeling import modeling_harmon


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def _prompts(pipe, texts=("a red circle",)):
    inputs = pipe.processor.generation_inputs(list(texts))
    return inputs["input_ids"], inputs["attention_mask"]


def _generate(pipe, seed=0, **settings):
    return pipe.model.generate_images(*_prompts(pipe), height=64, width=64, generator=_seed(seed),
                                      output_type="latent", **settings)


def test_reference_is_the_default_and_the_reference_sampler(pipe):
    """The releases' default preset is `reference`, whose fields are all off: the loop as the parity tests pin it
    (`num_iter` rounds, `num_inference_steps` each, both prompt halves every round, float32)."""
    assert pipe.model.image_generation_defaults["preset"] == "reference"
    assert SAMPLING_PRESETS["reference"] == HarmonSamplingPreset()
    settings = dict(num_iter=4, num_inference_steps=6)
    default = _generate(pipe, **settings)
    assert torch.equal(default, _generate(pipe, preset="reference", **settings))
    assert torch.equal(default, _generate(pipe, preset=HarmonSamplingPreset(), **settings))
    assert not torch.equal(default, _generate(pipe, preset="fast", **settings))


def _record_rounds(pipe, monkeypatch):
    """Per round the head samples in: (diffusion steps, conditions it got); per run_round call: prompt rows, output."""
    head, inner = pipe.model.model.diffusion_head, pipe.model.model
    samples, rounds = [], []
    sample, run_round = head.sample, inner.run_round

    def recording_sample(conditions, scheduler, *args, **kwargs):
        sampled = sample(conditions, scheduler, *args, **kwargs)
        samples.append((len(scheduler.timesteps), conditions.clone()))  # the steps it has just run
        return sampled

    def recording_run_round(tokens, mask, grid_size, prompt_cache, prompt_attention_mask, *args, **kwargs):
        output = run_round(tokens, mask, grid_size, prompt_cache, prompt_attention_mask, *args, **kwargs)
        rounds.append((prompt_attention_mask.shape[0], output.conditions.clone()))
        return output

    monkeypatch.setattr(head, "sample", recording_sample)
    monkeypatch.setattr(inner, "run_round", recording_run_round)
    return samples, rounds


def test_fewer_rounds_generate_every_token(pipe, monkeypatch):
    """round_fraction: ceil(fraction * min(num_iter, tokens)) rounds, and the image is complete after them."""
    rounds_seen = []
    preset = HarmonSamplingPreset(round_fraction=0.25)
    for num_iter, expected in ((64, math.ceil(0.25 * 16)), (6, math.ceil(0.25 * 6))):  # 64 px: 16 tokens
        rounds_seen.clear()
        latents = _generate(pipe, num_iter=num_iter, num_inference_steps=3, preset=preset,
                            callback=lambda index, masked, tokens: rounds_seen.append(masked))
        assert len(rounds_seen) == expected and rounds_seen[-1] == 0
        assert (latents.abs().sum(dim=-1) > 0).all()  # no token left at its masked value (zeros)


def test_diffusion_steps_fall_linearly_over_the_rounds(pipe, monkeypatch):
    """DiSA: the first round takes first_round_steps of num_inference_steps, the last last_round_steps, linearly
    between, on the head's own process respaced (the reference scheduler's timesteps for that count)."""
    samples, _ = _record_rounds(pipe, monkeypatch)
    _generate(pipe, num_iter=4, num_inference_steps=20,
              preset=HarmonSamplingPreset(first_round_steps=0.5, last_round_steps=2))
    assert [steps for steps, _ in samples] == [10, 7, 4, 2]
    samples.clear()
    _generate(pipe, num_iter=4, num_inference_steps=20, preset=HarmonSamplingPreset(first_round_steps=0.5))
    assert [steps for steps, _ in samples] == [10, 10, 10, 10]


def test_guidance_reuse_runs_the_unconditional_prompts_every_other_round(pipe, monkeypatch):
    """LazyMAR's condition cache: in the rounds between refreshes only the conditional prompt goes through the LLM,
    and the head's unconditional conditions are the conditional ones minus the last refreshed difference."""
    samples, rounds = _record_rounds(pipe, monkeypatch)
    _generate(pipe, num_iter=4, num_inference_steps=3, guidance_scale=3.0,
              preset=HarmonSamplingPreset(guidance_refresh=2))
    assert [rows for rows, _ in rounds] == [2, 1, 2, 1]  # one image: conditional + unconditional, or conditional
    (_, refreshed), (_, reused) = rounds[0], rounds[1]
    difference = refreshed[0] - refreshed[1]  # (h*w, d) per token
    _, conditions = samples[1]
    conditional, unconditional = conditions.chunk(2)
    for row, condition in zip(unconditional, conditional):
        (position,) = [index for index in range(reused.shape[1]) if torch.equal(reused[0, index], condition)]
        assert torch.equal(row, condition - difference[position])
    # Without guidance there is nothing to reuse: the reference's loop.
    assert torch.equal(_generate(pipe, num_iter=4, num_inference_steps=3, guidance_scale=1.0),
                       _generate(pipe, num_iter=4, num_inference_steps=3, guidance_scale=1.0,
                                 preset=HarmonSamplingPreset(guidance_refresh=2)))


def test_bfloat16_only_where_the_hardware_computes_it(pipe, monkeypatch):
    """Networks under bfloat16 autocast where the device has bfloat16 units, float32 elsewhere; the tokens stay
    float32 either way."""
    autocast_in_llm = []
    language_model = pipe.model.model.language_model
    forward = language_model.forward
    monkeypatch.setattr(language_model, "forward", lambda *a, **k: autocast_in_llm.append(
        torch.is_autocast_enabled("cpu")) or forward(*a, **k))
    settings = dict(num_iter=3, num_inference_steps=4)
    reference = _generate(pipe, **settings)
    preset = HarmonSamplingPreset(bfloat16=True)

    monkeypatch.setattr(modeling_harmon, "computes_bfloat16_natively", lambda device: False)
    autocast_in_llm.clear()
    assert torch.equal(_generate(pipe, preset=preset, **settings), reference)
    assert autocast_in_llm and not any(autocast_in_llm)

    monkeypatch.setattr(modeling_harmon, "computes_bfloat16_natively", lambda device: True)
    autocast_in_llm.clear()
    bfloat16 = _generate(pipe, preset=preset, **settings)
    assert autocast_in_llm and all(autocast_in_llm)
    assert bfloat16.dtype == torch.float32 and not torch.equal(bfloat16, reference)
    assert torch.isfinite(bfloat16).all()


def test_bfloat16_detection_reads_the_processor():
    on_cpu = modeling_harmon.computes_bfloat16_natively(torch.device("cpu"))
    flags = open("/proc/cpuinfo").read().split()
    assert on_cpu == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("preset, message", [
    ("quick", "preset must be one of ['fast', 'fastest', 'reference']"),
    ({"rounds": 0.5}, "unknown sampling preset fields ['rounds']"),
    ({"round_fraction": 0}, "round_fraction must be a fraction in (0, 1], got 0"),
    ({"first_round_steps": 1.5}, "first_round_steps must be a fraction in (0, 1], got 1.5"),
    ({"last_round_steps": 0}, "last_round_steps must be a positive integer or None, got 0"),
    ({"guidance_refresh": 0}, "guidance_refresh must be a positive integer, got 0"),
    ({"bfloat16": "yes"}, "bfloat16 must be True or False, got 'yes'"),
    (3, "preset must be a name, a dict or a HarmonSamplingPreset, got int"),
])
def test_a_bad_preset_is_refused_by_name(pipe, preset, message):
    with pytest.raises(ValueError) as error:
        _generate(pipe, num_iter=2, num_inference_steps=2, preset=preset)
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:
        pipe("a red circle", num_iter=2, num_inference_steps=2, preset=preset)
    assert message in str(error.value)


def test_a_generation_config_may_hold_a_preset_of_its_own(pipe, monkeypatch, tmp_path):
    custom = {"round_fraction": 0.5, "last_round_steps": 2}
    settings = dict(num_iter=4, num_inference_steps=6)
    expected = _generate(pipe, preset=HarmonSamplingPreset(**custom), **settings)
    monkeypatch.setitem(pipe.model.generation_config.image_generation, "preset", custom)
    assert torch.equal(_generate(pipe, **settings), expected)
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "model" / "generation_config.json").read_text())["image_generation"]
    assert saved["preset"] == custom


def test_the_pipeline_reports_the_rounds_it_runs(pipe):
    seen = []
    pipe("a red circle", num_iter=64, num_inference_steps=2, preset="fastest",
         callback_on_step_end=lambda p, index, masked, tensors: seen.append(p.num_timesteps) or tensors)
    assert seen == [math.ceil(0.25 * 16)] * len(seen) and len(seen) == pipe.num_timesteps


def test_the_command_takes_a_preset(pipe, harmon_folder, tmp_path):
    result = run_harmon("generate", "a red circle", "-o", tmp_path / "fastest.png", "--model", harmon_folder,
                        "--size", "64", "--rounds", "8", "--steps", "4", "--seed", "3", "--preset", "fastest")
    assert result.returncode == 0, result.stderr
    expected = pipe("a red circle", height=64, width=64, num_iter=8, num_inference_steps=4, preset="fastest",
                    generator=_seed(3), output_type="np").images[0]
    reference = pipe("a red circle", height=64, width=64, num_iter=8, num_inference_steps=4, generator=_seed(3),
                     output_type="np").images[0]
    image = np.asarray(Image.open(tmp_path / "fastest.png"))
    assert np.array_equal(image, expected) and not np.array_equal(image, reference)


def test_the_command_refuses_an_unknown_preset_before_loading(tmp_path):
    result = run_harmon("generate", "a red circle", "-o", tmp_path / "x.png", "--model", tmp_path / "missing",
                        "--preset", "quick")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "harmon generate: error: preset must be one of ['fast', 'fastest', 'reference'] or a HarmonSamplingPreset, "
        "got 'quick'"]


def test_shapes_eval_scores_a_preset(harmon_folder, tmp_path):
    result = run_harmon("eval", "shapes", "--model", harmon_folder, "--n", "5", "--rounds", "4", "--steps", "3",
                        "--preset", "fast", "--json", tmp_path / "scores.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "scores.json").read_text())["sampler"]["preset"] == "fast"
