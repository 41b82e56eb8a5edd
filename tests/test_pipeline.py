"""HarmonPipeline on the tiny model: outputs, seeds, batches, inpainting, schedulers and loading from one folder."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from conftest import WITHOUT_HARMON_HF
from harmon_hf import HarmonPipeline

FAST = dict(num_iter=4, num_inference_steps=6)


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("height, width", [(64, 64), (32, 96)])
def test_output_types_and_shapes(pipe, height, width):
    kwargs = dict(height=height, width=width, **FAST)
    pil = pipe("a red circle", generator=_seed(), **kwargs).images
    assert len(pil) == 1 and pil[0].size == (width, height) and pil[0].mode == "RGB"
    array = pipe("a red circle", output_type="np", generator=_seed(), **kwargs).images
    assert array.shape == (1, height, width, 3) and array.dtype == np.uint8
    tensor = pipe("a red circle", output_type="pt", generator=_seed(), **kwargs).images
    assert tensor.shape == (1, 3, height, width) and tensor.dtype == torch.uint8
    latents = pipe("a red circle", output_type="latent", generator=_seed(), **kwargs).images
    assert latents.shape == (1, height // 16, width // 16, 16)
    assert np.array_equal(np.asarray(pil[0]), array[0]) and np.array_equal(array[0], tensor[0].permute(1, 2, 0).numpy())


def test_latent_output_decodes_to_the_same_image(pipe):
    array = pipe("a blue square", output_type="np", generator=_seed(5), **FAST).images
    latents = pipe("a blue square", output_type="latent", generator=_seed(5), **FAST).images
    decoded = pipe.processor.image_processor.postprocess(pipe.model.decode_latents(latents), "np")
    assert np.array_equal(decoded, array)


def test_same_seed_same_images(pipe):
    first = pipe("a red circle", output_type="np", generator=_seed(1), **FAST).images
    again = pipe("a red circle", output_type="np", generator=_seed(1), **FAST).images
    other = pipe("a red circle", output_type="np", generator=_seed(2), **FAST).images
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_batch_of_prompts(pipe):
    images = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, output_type="np", generator=_seed(),
                  negative_prompt=["blurry", "dark"], **FAST).images
    assert images.shape == (4, 64, 64, 3)
    assert not np.array_equal(images[0], images[2])
    assert np.array_equal(images, pipe(["a red circle", "a blue square"], num_images_per_prompt=2, output_type="np",
                                       generator=_seed(), negative_prompt=["blurry", "dark"], **FAST).images)


def test_guidance_off_and_linear_schedule(pipe):
    plain = pipe("a red circle", guidance_scale=1.0, output_type="latent", generator=_seed(), **FAST).images
    linear = pipe("a red circle", guidance_schedule="linear", output_type="latent", generator=_seed(), **FAST).images
    assert plain.shape == linear.shape == (1, 4, 4, 16) and torch.isfinite(plain).all() and torch.isfinite(linear).all()


def _image_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 30))  # touches tokens (1..2, 1..2)
    return image, mask


def test_inpainting_keeps_unmasked_tokens_exactly(pipe):
    image, mask = _image_and_mask()
    result = pipe("a red circle", image=image, mask_image=mask, output_type="latent", generator=_seed(), **FAST).images
    pixels = torch.from_numpy(pipe.processor.image_processor.normalize(np.asarray(image)))[None]
    original = pipe.model.encode_images(pixels)
    regenerated = torch.zeros(4, 4, dtype=torch.bool)
    regenerated[1:2, 1:3] = True
    assert torch.equal(result[0][~regenerated], original[0][~regenerated])
    assert not torch.equal(result[0][regenerated], original[0][regenerated])


def test_outpainting_extends_the_image(pipe):
    image = Image.new("RGB", (32, 64), (200, 20, 20))
    canvas, mask = HarmonPipeline.prepare_outpainting(image, left=16, right=16)
    assert canvas.size == (64, 64) and np.asarray(mask)[:, :16].min() == 255 and np.asarray(mask)[:, 16:48].max() == 0
    result = pipe("a red wall", image=canvas, mask_image=mask, output_type="latent", generator=_seed(), **FAST).images
    original = pipe.model.encode_images(torch.from_numpy(pipe.processor.image_processor.normalize(np.asarray(canvas)))[None])
    assert torch.equal(result[0, :, 1:3], original[0, :, 1:3])
    assert not torch.equal(result[0, :, 0], original[0, :, 0])


def test_dpm_solver_for_fewer_steps(pipe):
    original = pipe.scheduler
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        with pytest.raises(ValueError, match="variance_type=None"):
            pipe("a red circle", **FAST)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            original.config, variance_type=None, prediction_type="v_prediction"
        )
        with pytest.raises(ValueError, match="prediction_type='v_prediction'.*predicts 'epsilon'"):
            pipe("a red circle", **FAST)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, variance_type=None)
        latents = pipe("a red circle", num_iter=4, num_inference_steps=10, output_type="latent", generator=_seed()).images
        again = pipe("a red circle", num_iter=4, num_inference_steps=10, output_type="latent", generator=_seed()).images
    finally:
        pipe.scheduler = original
    assert torch.isfinite(latents).all() and torch.equal(latents, again)


def test_callback_and_interrupt(pipe):
    seen = []

    def callback(pipeline, round_index, num_masked, tensors):
        seen.append((round_index, num_masked, tensors["latents"].shape))
        if round_index == 1:
            pipeline._interrupt = True
        return tensors

    pipe("a red circle", callback_on_step_end=callback, **FAST)
    assert [entry[0] for entry in seen] == [0, 1] and seen[0][2] == (1, 4, 4, 16) and seen[0][1] < 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=40), "height must be a positive multiple of 16, got 40"),
        (dict(output_type="jpeg"), "output_type must be one of"),
        (dict(num_iter=0), "num_iter must be a positive integer, got 0"),
        (dict(image=Image.new("RGB", (64, 64))), "both image and mask_image"),
        (dict(guidance_schedule="cosine"), "guidance_schedule must be one of"),
        (dict(height=0), "height must be a positive multiple of 16, got 0"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(height=100000), "a 100000x64 image after a 24-token prompt needs 25028 positions, more than the LLM's 4096"),
        (dict(prompt="red " * 5000), r"a 64x64 image after a \d+-token prompt needs \d+ positions, more than the LLM's"),
    ],
)
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "a red circle", **kwargs})


def test_an_oversized_inpainting_request_is_refused_before_the_image_is_resized(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "prepare_inpainting", lambda *args: pytest.fail("the image was prepared"))
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(ValueError, match="more than the LLM's 4096"):
        pipe("x", image=image, mask_image=mask, height=8192, width=8192)


def test_threads_sharing_a_pipeline_each_get_their_own_images(pipe):
    """The scheduler is state of the call in progress: two threads at once must not mix their steps."""
    def draw(steps):
        return pipe("a red circle", num_iter=4, num_inference_steps=steps, output_type="np", generator=_seed()).images

    alone = [draw(steps) for steps in (40, 25)]
    with ThreadPoolExecutor(2) as threads:
        together = list(threads.map(draw, (40, 25)))
    for image, expected in zip(together, alone):
        assert np.array_equal(image, expected)


def test_empty_mask_is_refused(pipe):
    with pytest.raises(ValueError, match="masks nothing"):
        pipe("x", image=Image.new("RGB", (64, 64)), mask_image=Image.new("L", (64, 64), 0), **FAST)


DIFFUSERS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    from transformers import AutoModel

    folder, output = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a red circle", num_iter=4, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    np.save(output, latents.numpy())
    model = AutoModel.from_pretrained(f"{folder}/model", trust_remote_code=True)  # its model folder, as any other
    print("LOADED:" + json.dumps([type(part).__name__ for part in (pipe, pipe.model, pipe.processor, pipe.scheduler,
                                                                       model)] + ["harmon_hf" in sys.modules]))
    """
)


@pytest.mark.parametrize("harmon_hf_installed", [True, False])
def test_a_pipeline_folder_loads_through_diffusers_own_entry_point(pipe, tmp_path, harmon_hf_installed):
    """`save_pretrained` writes diffusers' layout with each component's code; `DiffusionPipeline.from_pretrained`
    gives the same image as the pipeline that saved it, with harmon_hf and in a Python where it cannot be imported."""
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert {name: index[name] for name in ("_class_name", "model", "processor", "scheduler")} == {
        "_class_name": ["pipeline_harmon", "HarmonPipeline"], "model": ["modeling_harmon", "HarmonForConditionalGeneration"],
        "processor": ["processing_harmon", "HarmonProcessor"], "scheduler": ["scheduling_harmon", "HarmonDiffusionScheduler"]}
    expected = pipe("a red circle", output_type="latent", generator=_seed(), **FAST).images
    reloaded = HarmonPipeline.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded("a red circle", output_type="latent", generator=_seed(), **FAST).images, expected)

    script = (WITHOUT_HARMON_HF if not harmon_hf_installed else "") + DIFFUSERS_SCRIPT
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved"), str(tmp_path / "latents.npy")],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.split("LOADED:", 1)[1])
    assert loaded == ["HarmonPipeline", "HarmonForConditionalGeneration", "HarmonProcessor",
                      "HarmonDiffusionScheduler", "HarmonForConditionalGeneration", False]
    assert np.array_equal(np.load(tmp_path / "latents.npy"), expected.numpy())


def test_streamed_answer_equals_the_generated_one(pipe, capsys):
    from harmon_hf.answering import image_question
    from harmon_hf.cli import stream_answer

    image = Image.new("RGB", (48, 64), (0, 128, 255))
    messages = [image_question("What colour is it?")]
    streamed = stream_answer(pipe, messages, [image], max_new_tokens=8)
    assert capsys.readouterr().out.strip() == streamed
    text = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = pipe.processor(text=text, images=image)
    stop_ids = pipe.processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generated = pipe.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=stop_ids)
    assert pipe.processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])[0] == streamed


def test_multi_turn_chat_keeps_the_image_and_history(pipe):
    from harmon_hf.answering import image_question

    messages = [image_question("Colour?"), {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Shape?"}]
    text = pipe.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = pipe.processor(text=text, images=Image.new("RGB", (64, 64)))
    assert (inputs["input_ids"] == pipe.processor.image_token_id).sum() == pipe.processor.num_image_tokens()
    output = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_answers_stop_where_the_llms_positions_end(pipe, monkeypatch):
    from harmon_hf.answering import answer, image_question

    image, messages = Image.new("RGB", (64, 64)), [image_question("What colour is it?")]
    prompt = pipe.processor(text=pipe.processor.apply_chat_template(messages, add_generation_prompt=True), images=image)
    prompt_length = prompt["input_ids"].shape[1]
    asked = {}
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda **kwargs: asked.update(kwargs) or generate(**kwargs))
    text_config = pipe.model.config.text_config
    monkeypatch.setattr(text_config, "max_position_embeddings", prompt_length + 3)
    answer(pipe, messages, [image], max_new_tokens=50)
    assert asked["max_new_tokens"] == 3
    monkeypatch.setattr(text_config, "max_position_embeddings", prompt_length)
    with pytest.raises(ValueError, match=f"the conversation and its answer needs {prompt_length + 1} positions"):
        answer(pipe, messages, [image], max_new_tokens=50)


def test_a_failing_streamed_answer_raises_instead_of_hanging(pipe):
    """An error in the generation thread used to leave the streamer, and `harmon describe`, waiting forever."""
    from harmon_hf.answering import image_question
    from harmon_hf.cli import stream_answer

    outcome = {}

    def ask():
        try:
            stream_answer(pipe, [image_question("Colour?")], [Image.new("RGB", (64, 64))], max_new_tokens=0)
        except ValueError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "stream_answer hangs"
    assert outcome["error"] == "max_new_tokens must be a positive integer, got 0"


@pytest.mark.parametrize("class_name", [None, "os.system", "Harmon"])
def test_a_scheduler_config_that_names_no_scheduler_is_refused_by_name(pipe, tmp_path, class_name):
    import json

    pipe.save_pretrained(tmp_path)
    config_file = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.pop("_class_name")
    if class_name is not None:
        config["_class_name"] = class_name
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"_class_name must name a diffusers scheduler or HarmonDiffusionScheduler, "
                                         f"got {class_name!r}"):
        HarmonPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("preset", ["reference", "fast", "fastest"])
def test_the_pipeline_samples_with_the_models_one_loop(pipe, monkeypatch, preset):
    """The pipeline (and so the `harmon` command, the Space and ShapesEval, which all call it) runs
    `generate_images`, and gives its images, for every preset; no other code walks the rounds."""
    from conftest import REPO

    inputs = pipe.processor.generation_inputs(["a red circle"])
    bare = pipe.model.generate_images(inputs["input_ids"], inputs["attention_mask"], generator=_seed(7),
                                      preset=preset, **FAST)
    calls = []
    generate_images = pipe.model.generate_images
    monkeypatch.setattr(pipe.model, "generate_images", lambda *a, **k: calls.append(k) or generate_images(*a, **k))
    images = pipe("a red circle", generator=_seed(7), output_type="pt", preset=preset, **FAST).images
    assert len(calls) == 1 and calls[0]["scheduler"] is pipe.scheduler
    assert torch.equal(images, pipe.processor.image_processor.postprocess(bare, "pt"))
    sources = [path for folder in ("src", "modeling", "spaces", "training") for path in (REPO / folder).rglob("*.py")
               if "models" not in path.parts]  # the bundled model's copy of modeling/ aside
    schedules = [path.name for path in sources for line in path.read_text().splitlines()
                 if "num_masked_after_round(" in line and not line.lstrip().startswith("def ")]
    assert schedules == ["modeling_harmon.py"]


MODEL_SETTINGS = {"num_iter": 3, "guidance_scale": 2.0, "guidance_schedule": "linear", "temperature": 0.8,
                  "num_inference_steps": 5, "preset": "fastest"}


def test_sampling_defaults_come_from_the_models_generation_config(pipe, monkeypatch):
    """One source for the defaults: what the model's generation_config says, for the bare model and the pipeline."""
    release = pipe.model.image_generation_defaults
    assert release == {"num_iter": 64, "guidance_scale": 3.0, "guidance_schedule": "constant", "temperature": 1.0,
                       "num_inference_steps": 100, "preset": "reference"}
    monkeypatch.setattr(pipe.model.generation_config, "image_generation", dict(MODEL_SETTINGS))
    by_default = pipe("a red circle", generator=_seed(3), output_type="latent").images
    assert torch.equal(by_default, pipe("a red circle", generator=_seed(3), output_type="latent",
                                        **MODEL_SETTINGS).images)
    assert not torch.equal(by_default, pipe("a red circle", generator=_seed(3), output_type="latent",
                                            **{**MODEL_SETTINGS, "temperature": 1.0}).images)
    inputs = pipe.processor.generation_inputs(["a red circle"])
    bare = pipe.model.generate_images(inputs["input_ids"], inputs["attention_mask"], generator=_seed(3),
                                      output_type="latent")
    assert torch.equal(bare, by_default)


def test_saved_and_converted_folders_carry_the_sampling_defaults(pipe, tiny_folder, tmp_path, monkeypatch):
    import json

    converted = json.loads((tiny_folder / "generation_config.json").read_text())["image_generation"]
    assert converted["num_iter"] == 64 and converted["num_inference_steps"] == 100
    monkeypatch.setattr(pipe.model.generation_config, "image_generation", dict(MODEL_SETTINGS))
    pipe.save_pretrained(tmp_path)
    assert HarmonPipeline.from_pretrained(tmp_path).model.image_generation_defaults == MODEL_SETTINGS


def test_the_command_and_the_demo_start_from_the_models_defaults(pipe, tmp_path, monkeypatch):
    from conftest import run_harmon
    from harmon_hf.demo import HarmonDemo

    monkeypatch.setattr(pipe.model.generation_config, "image_generation", dict(MODEL_SETTINGS))
    pipe.save_pretrained(tmp_path / "model")
    explicit = ["--rounds", "3", "--guidance", "2.0", "--temperature", "0.8", "--steps", "5", "--preset", "fastest"]
    for name, flags in (("default.png", []), ("explicit.png", explicit)):
        result = run_harmon("generate", "a red circle", "-o", tmp_path / name, "--model", tmp_path / "model", *flags)
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "default.png")),
                          np.asarray(Image.open(tmp_path / "explicit.png")))

    page = HarmonDemo(pipe).blocks()
    values = {block.elem_id: getattr(block, "value", None) for block in page.blocks.values()
              if getattr(block, "elem_id", None)}
    assert (values["generate-rounds"], values["generate-steps"], values["generate-guidance"],
            values["generate-temperature"], values["generate-preset"]) == (3, 5, 2.0, 0.8, "fastest")


def test_one_generator_per_image_gives_each_image_its_own_draws(pipe):
    """diffusers' convention: with a list of generators, image i is the image its generator gives alone."""
    prompts = ["a red circle", "a blue square on the left"]
    together = pipe(prompts, generator=[_seed(1), _seed(2)], output_type="latent", **FAST).images
    for index, prompt in enumerate(prompts):
        alone = pipe(prompt, generator=_seed(index + 1), output_type="latent", **FAST).images[0]
        # The same draws; only the batched LLM and MAR passes round differently (the tiny random model's latents
        # reach 1e5, so the tolerance is relative to their scale).
        scale = alone.abs().max()
        assert (together[index] - alone).abs().max() <= 1e-5 * scale, index
    assert (together[0] - together[1]).abs().max() > 1e-2 * together.abs().max()
    with pytest.raises(ValueError, match="got 1 generators for 2 images"):
        pipe(prompts, generator=[_seed(1)], **FAST)


def test_latents_are_every_tokens_starting_noise(pipe):
    """In one round (the order does not matter) with a deterministic solver, the image depends on the starting
    noise alone: the same latents under other seeds give the same image, other latents another."""
    from diffusers import DPMSolverMultistepScheduler

    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, variance_type=None)
    try:
        noise = torch.randn(1, 4, 4, 16, generator=_seed(5))
        settings = dict(num_iter=1, num_inference_steps=6, output_type="latent")
        first = pipe("a red circle", latents=noise, generator=_seed(1), **settings).images
        second = pipe("a red circle", latents=noise, generator=_seed(2), **settings).images
        other = pipe("a red circle", latents=noise.flip(-1), generator=_seed(1), **settings).images
        drawn = pipe("a red circle", generator=_seed(1), **settings).images
    finally:
        pipe.scheduler = original
    assert torch.equal(first, second)
    assert not torch.allclose(first, other, atol=1e-3) and not torch.allclose(first, drawn, atol=1e-3)
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 4, 4, 16\).*got \(1, 2, 2, 16\)"):
        pipe("a red circle", latents=torch.zeros(1, 2, 2, 16), **FAST)


def test_prompt_embeddings_give_the_prompts_image(pipe):
    expected = pipe("a red circle", negative_prompt="a square", generator=_seed(4), output_type="latent",
                    **FAST).images
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt("a red circle", "a square")
    from_embeds = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative_embeds,
                       negative_prompt_attention_mask=negative_mask, generator=_seed(4), output_type="latent",
                       **FAST).images
    assert torch.equal(from_embeds, expected)
    # Without negative embeddings, guidance takes Harmon's unconditional prompt, as `prompt` alone does.
    unconditional = pipe("a red circle", generator=_seed(4), output_type="latent", **FAST).images
    assert torch.equal(pipe(prompt_embeds=embeds, prompt_attention_mask=mask, generator=_seed(4),
                            output_type="latent", **FAST).images, unconditional)
    with pytest.raises(ValueError, match="give prompt or prompt_embeds, not both"):
        pipe("a red circle", prompt_embeds=embeds, prompt_attention_mask=mask, **FAST)
    with pytest.raises(ValueError, match="prompt_embeds need prompt_attention_mask"):
        pipe(prompt_embeds=embeds, **FAST)


def test_diffusers_callback_objects_see_the_latents(pipe):
    from diffusers.callbacks import PipelineCallback

    class RecordLatents(PipelineCallback):
        tensor_inputs = ["latents"]

        def __init__(self):
            super().__init__(cutoff_step_index=None)
            self.shapes = []

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.shapes.append(tuple(callback_kwargs["latents"].shape))
            return callback_kwargs

    record = RecordLatents()
    pipe("a red circle", callback_on_step_end=record, **FAST)
    assert record.shapes == [(1, 4, 4, 16)] * 4


def test_push_to_hub_uploads_the_finished_pipeline_folder(pipe, tmp_path, monkeypatch):
    """The upload happens after model_index.json names the code files: what reaches the Hub loads with diffusers."""
    from types import SimpleNamespace

    import harmon_hf.modeling.pipeline_harmon as pipeline_module

    uploads = []
    monkeypatch.setattr(pipeline_module, "create_repo",
                        lambda repo_id, **options: SimpleNamespace(repo_id=f"someone/{repo_id}"))
    monkeypatch.setattr(pipeline_module, "upload_folder", lambda **options: uploads.append(
        (options["repo_id"], json.loads((Path(options["folder_path"]) / "model_index.json").read_text()),
         sorted(path.name for path in Path(options["folder_path"]).rglob("*.py")))))
    pipe.save_pretrained(tmp_path / "harmon-tiny", push_to_hub=True)
    assert len(uploads) == 1
    repo_id, index, code = uploads[0]
    assert repo_id == "someone/harmon-tiny" and index["_class_name"] == ["pipeline_harmon", "HarmonPipeline"]
    assert {"pipeline_harmon.py", "modeling_harmon.py", "processing_harmon.py", "scheduling_harmon.py"} <= set(code)
