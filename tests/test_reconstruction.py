"""RecA's reconstruction task: the model draws an image back from its own understanding features of it."""

from collections import Counter

import pytest
import torch
from transformers import AutoProcessor

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.training import HarmonDataCollator, Recipe, build_training_stream, train
from harmon_hf.training.data import RECONSTRUCTION_REQUESTS
from test_training import fixed_task_losses, log_history, make_recipe
from tiny_data import write_caption_parquet, write_conversation_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruction-data")
    return {
        "images": write_caption_parquet(root / "images.parquet"),
        # Any image source feeds the task: here the "image" column of a conversation file with a truncated PNG.
        "images_with_bad": write_conversation_jsonl(root / "conversations-bad", broken_image=True),
        "conversations": write_conversation_jsonl(root / "conversations"),
    }


def reca_sources(data, images="images", shuffle_buffer=1000):
    return [
        {"path": str(data[images]), "task": "reconstruction", "ratio": 0.5, "shuffle_buffer": shuffle_buffer},
        {"path": str(data["conversations"]), "task": "image_to_text", "conversations_column": "conversations",
         "ratio": 0.5, "shuffle_buffer": shuffle_buffer},
    ]


def reconstruction_batch(harmon_folder, data, tmp_path, count=4):
    recipe = make_recipe(harmon_folder, tmp_path, [{"path": str(data["images"]), "task": "reconstruction",
                                                    "ratio": 1.0}])
    processor = AutoProcessor.from_pretrained(harmon_folder)
    samples = [sample for sample, _ in zip(build_training_stream(recipe, processor), range(count))]
    collator = HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor, recipe.image_size)
    return processor, collator(samples)["reconstruction"]


def test_samples_are_an_understanding_prompt_of_the_image_to_draw(harmon_folder, data, tmp_path):
    processor, batch = reconstruction_batch(harmon_folder, data, tmp_path)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}  # no caption, no labels
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    placeholders = (batch["input_ids"] == processor.image_token_id).sum(dim=1)
    assert placeholders.tolist() == [processor.num_image_tokens(64)] * 4
    text = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    prompt = text.replace("<image>", "")
    assert prompt.startswith("<|im_start|>user\n\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.removeprefix("<|im_start|>user\n\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n") in (
        *RECONSTRUCTION_REQUESTS, "Generate an image.")


def test_loss_is_the_diffusion_loss_of_the_image_prompted_by_its_own_features(harmon_folder, data, tmp_path):
    processor, batch = reconstruction_batch(harmon_folder, data, tmp_path)
    model = HarmonForConditionalGeneration.from_pretrained(harmon_folder).eval().model
    input_ids, attention_mask, pixel_values = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    latents = model.encode_images(pixel_values)  # (4, h, w, c)
    tokens = latents.shape[1] * latents.shape[2]
    generator = torch.Generator().manual_seed(0)
    mask = model.random_mask(4, tokens, generator=generator)
    draws = 4 * tokens * model.config.diffusion_batch_mul
    timesteps = torch.randint(0, model.config.num_train_timesteps, (draws,), generator=generator)
    noise = torch.randn(draws, model.config.token_channels, generator=generator)
    fixed = {"mask": mask, "timesteps": timesteps, "noise": noise}

    # By hand: the image's latents are the target, and its understanding features stand where its placeholders are.
    features = model.get_image_features(pixel_values).pooler_output
    prompt = model.get_input_embeddings()(input_ids).clone()
    prompt[input_ids == processor.image_token_id] = features.reshape(-1, features.shape[-1])
    expected = model.text_to_image_loss(None, attention_mask, latents=latents, inputs_embeds=prompt, **fixed)

    actual = model.reconstruction_loss(input_ids, attention_mask, pixel_values, **fixed)
    torch.testing.assert_close(actual, expected)
    # The features matter: the same prompt with the placeholders' own embeddings gives another loss.
    without_features = model.text_to_image_loss(input_ids, attention_mask, latents=latents, **fixed)
    assert not torch.isclose(actual, without_features)


def encoder_gradient(model, batch, scale: float) -> torch.Tensor:
    model.config.visual_gradient_scale = scale
    model.zero_grad()
    torch.manual_seed(0)  # the same mask, timesteps and noise for every scale
    model.reconstruction_loss(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).backward()
    return torch.cat([p.grad.flatten() for p in model.mar_encoder.parameters()])


def test_gradient_reaches_the_mar_encoder_through_the_features_at_a_tenth(harmon_folder, data, tmp_path):
    _, batch = reconstruction_batch(harmon_folder, data, tmp_path)
    model = HarmonForConditionalGeneration.from_pretrained(harmon_folder).eval().model
    assert model.config.visual_gradient_scale == 0.1
    # The encoder learns twice: as the image decoder's encoder (visible tokens, unscaled) and through the features
    # in the prompt (scaled). The gradient is linear in the scale; its part through the features is not zero.
    direct, tenth, whole = (encoder_gradient(model, batch, scale) for scale in (0.0, 0.1, 1.0))
    through_features = whole - direct
    assert through_features.abs().max() > 1e-3 * whole.abs().max()
    torch.testing.assert_close(tenth - direct, 0.1 * through_features, rtol=1e-3, atol=1e-8)


def test_reconstruction_with_image_to_text_trains_and_resumes_exactly(harmon_folder, data, tmp_path):
    processor = AutoProcessor.from_pretrained(harmon_folder)
    constant = {"lr_scheduler_type": "constant", "warmup_steps": 0}
    straight = make_recipe(harmon_folder, tmp_path / "straight", reca_sources(data),
                           training={**constant, "max_steps": 20})
    samples = [sample for sample, _ in zip(build_training_stream(straight, processor), range(16))]
    assert {s["task"] for s in samples} == {"reconstruction", "image_to_text"}
    collator = HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor, 64)
    before = fixed_task_losses(HarmonForConditionalGeneration.from_pretrained(harmon_folder), collator, samples)
    final = train(straight)
    after = fixed_task_losses(HarmonForConditionalGeneration.from_pretrained(final), collator, samples)
    for task in before:
        assert after[task] < 0.9 * before[task], (task, before[task], after[task])
    assert any("loss_reconstruction" in entry for entry in log_history(tmp_path / "straight"))

    # Resumed halfway through a shorter run, as the same run uninterrupted.
    short = {**constant, "save_steps": 2}
    final = train(make_recipe(harmon_folder, tmp_path / "short", reca_sources(data), training={**short, "max_steps": 4}))
    train(make_recipe(harmon_folder, tmp_path / "resumed", reca_sources(data), training={**short, "max_steps": 2}))
    train(make_recipe(harmon_folder, tmp_path / "resumed", reca_sources(data), training={**short, "max_steps": 4}),
          resume=True)

    def losses(folder):
        return {entry["step"]: entry["loss"] for entry in log_history(folder) if "loss" in entry}

    assert losses(tmp_path / "short") == losses(tmp_path / "resumed")
    expected = HarmonForConditionalGeneration.from_pretrained(final).state_dict()
    actual = HarmonForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_bad_images_are_skipped_and_counted(harmon_folder, data, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path, reca_sources(data, images="images_with_bad", shuffle_buffer=0))
    processor = AutoProcessor.from_pretrained(harmon_folder)
    samples = [sample for sample, _ in zip(build_training_stream(recipe, processor), range(12))]
    skipped = Counter(reason.split(":")[0] for sample in samples for reason in sample["skipped_before"])
    assert skipped == {"unreadable image": 1}
    assert all(sample["image"] for sample in samples if sample["task"] == "reconstruction")


def test_reca_recipes_carry_recas_settings():
    reca = Recipe.load("reca")
    assert set(reca.learning_rates.values()) == {1e-5} and not reca.frozen and reca.image_size == 512
    assert {source.task: source.ratio for source in reca.data} == {"reconstruction": 0.5, "image_to_text": 0.5}
    assert reca.training["per_device_train_batch_size"] * reca.training["gradient_accumulation_steps"] == 4 * 48
    assert reca.weight_decay == 0.02 and reca.unconditional_probability == 0.1
    shapes = Recipe.load("shapes/reca")
    assert {source.task: source.ratio for source in shapes.data} == {"reconstruction": 0.5, "image_to_text": 0.5}
    ordinary = Recipe.load("shapes/stage3")  # the fair comparison: the same rates and length as stage III
    assert shapes.learning_rates == ordinary.learning_rates
    assert shapes.training["max_steps"] == ordinary.training["max_steps"]
