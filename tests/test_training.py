"""Training on a tiny model and tiny datasets read through `datasets` streaming."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.training import HarmonDataCollator, Recipe, build_training_stream, parameter_groups, train
from harmon_hf.training.recipe import from_dict
from harmon_hf.training.run import load_model
from conftest import run_harmon
from tiny_data import caption_rows, write_caption_parquet, write_conversation_jsonl, write_text_jsonl

ALL_MODULES_LR = {name: 1e-3 for name in ("language_model", "mar_encoder", "mar_decoder", "diffusion_head",
                                          "proj_in", "proj_out")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-data")
    too_long = ("word " * 600, caption_rows(1)[0][1])
    return {
        "parquet": write_caption_parquet(root / "captions.parquet"),
        "parquet_with_bad": write_caption_parquet(root / "bad.parquet", extra=[too_long]),
        "conversations": write_conversation_jsonl(root / "conversations"),
        "conversations_with_bad": write_conversation_jsonl(root / "conversations-bad", broken_image=True),
        "text": write_text_jsonl(root / "text.jsonl"),
        "root": root,
    }


def make_recipe(harmon_folder, output_dir, sources, **changes) -> Recipe:
    values = {
        "model": str(harmon_folder),
        "output_dir": str(output_dir),
        "image_size": 64,
        "max_text_tokens": 64,
        "learning_rates": dict(ALL_MODULES_LR),
        "data": sources,
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 1000,
                     "disable_tqdm": True},
    }
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key == "training" else value
    return from_dict(Recipe, values, "recipe")


def three_task_sources(data, bad=False, shuffle_buffer=1000):
    return [
        {"path": str(data["parquet_with_bad" if bad else "parquet"]), "task": "text_to_image", "ratio": 0.5,
         "shuffle_buffer": shuffle_buffer},
        {"path": str(data["conversations_with_bad" if bad else "conversations"]), "task": "image_to_text",
         "conversations_column": "conversations", "ratio": 0.3, "shuffle_buffer": shuffle_buffer},
        {"path": str(data["text"]), "task": "text", "ratio": 0.2, "shuffle_buffer": shuffle_buffer},
    ]


def log_history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@torch.no_grad()
def fixed_task_losses(model, collator, samples) -> dict[str, float]:
    """Each task's loss on fixed samples, with fixed diffusion randomness: comparable across checkpoints."""
    batch = collator(samples)
    batch.pop("skipped")
    torch.manual_seed(0)
    return {task: loss.item() for task, loss in model(task_batches=batch).task_losses.items()}


def test_losses_of_each_task_fall(harmon_folder, data, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", three_task_sources(data), training={"max_steps": 30})
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(harmon_folder)
    stream = build_training_stream(recipe, processor)
    samples = [sample for sample, _ in zip(stream, range(24))]
    assert {s["task"] for s in samples} == {"text_to_image", "image_to_text", "text"}
    collator = HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor, 64)
    before = fixed_task_losses(HarmonForConditionalGeneration.from_pretrained(harmon_folder), collator, samples)
    final = train(recipe)
    after = fixed_task_losses(HarmonForConditionalGeneration.from_pretrained(final), collator, samples)
    for task in before:
        assert after[task] < 0.9 * before[task], (task, before[task], after[task])
    logged = [entry for entry in log_history(tmp_path / "run") if "loss" in entry]
    assert len(logged) == 30 and all(any(f"loss_{task}" in entry for entry in logged) for task in before)


def test_frozen_modules_stay_bit_identical(harmon_folder, data, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", three_task_sources(data),
                         frozen=["language_model", "mar_encoder"],
                         learning_rates={"mar_decoder": 1e-3, "diffusion_head": 1e-3, "proj_in": 1e-3, "proj_out": 1e-3})
    before = HarmonForConditionalGeneration.from_pretrained(harmon_folder).state_dict()
    after = HarmonForConditionalGeneration.from_pretrained(train(recipe)).state_dict()
    for name, tensor in before.items():
        frozen = name.startswith(("model.language_model.", "model.mar_encoder.", "model.vae.", "lm_head."))
        assert torch.equal(tensor, after[name]) == frozen, name


def test_optimizer_groups_follow_the_recipe(harmon_folder, data, tmp_path):
    rates = {"language_model": 1e-5, "mar_encoder": 2e-5, "mar_decoder": 1e-4, "diffusion_head": 3e-4,
             "proj_in": 4e-4, "proj_out": 5e-4}
    recipe = make_recipe(harmon_folder, tmp_path / "run", three_task_sources(data), learning_rates=rates,
                         weight_decay=0.02)
    model = load_model(recipe)
    groups = parameter_groups(model, recipe.learning_rates, recipe.weight_decay)
    by_id = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        assert group["lr"] == rates[group["module"]]
        for parameter in group["params"]:
            name = by_id[id(parameter)]
            no_decay = parameter.ndim < 2 or ".diffusion_head." in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.02), name
            assert f".{group['module']}." in name or name.startswith("lm_head")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}
    assert not any(p.requires_grad for p in model.model.vae.parameters())


def test_resume_continues_exactly(harmon_folder, data, tmp_path):
    constant = {"lr_scheduler_type": "constant", "warmup_steps": 0, "save_steps": 4}
    sources = three_task_sources(data)
    straight = make_recipe(harmon_folder, tmp_path / "straight", sources, training={**constant, "max_steps": 8})
    train(straight)
    first_half = make_recipe(harmon_folder, tmp_path / "resumed", sources, training={**constant, "max_steps": 4})
    train(first_half)
    interrupted = tmp_path / "resumed" / "checkpoint-6"  # a save cut short: it must not be resumed from
    interrupted.mkdir()
    (interrupted / "trainer_state.json").write_text("{")
    second_half = make_recipe(harmon_folder, tmp_path / "resumed", sources, training={**constant, "max_steps": 8})
    train(second_half, resume=True)

    def losses(folder):
        return {entry["step"]: entry["loss"] for entry in log_history(folder) if "loss" in entry}

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    expected = HarmonForConditionalGeneration.from_pretrained(tmp_path / "straight" / "final").state_dict()
    actual = HarmonForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    from transformers import AutoProcessor  # every checkpoint carries the processor: it loads as a model folder alone

    assert AutoProcessor.from_pretrained(tmp_path / "straight" / "checkpoint-4").num_buffer_tokens == 4


def test_bad_samples_are_skipped_counted_and_keep_the_mix(harmon_folder, data, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(harmon_folder)
    # In file order, so that the bad rows (near the start) are met, and few enough samples that no source wraps.
    clean = make_recipe(harmon_folder, tmp_path, three_task_sources(data, shuffle_buffer=0))
    dirty = make_recipe(harmon_folder, tmp_path, three_task_sources(data, bad=True, shuffle_buffer=0))
    collator = HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor, 64)

    def read(recipe, count=48):
        samples = [sample for sample, _ in zip(build_training_stream(recipe, processor), range(count))]
        skipped = Counter()
        for start in range(0, count, 8):
            skipped.update(collator(samples[start : start + 8])["skipped"])
        return samples, skipped

    clean_samples, clean_skipped = read(clean)
    dirty_samples, dirty_skipped = read(dirty)
    assert clean_skipped == {} and dirty_skipped == {"unreadable image": 1, "over-long text": 1}
    # The sources are drawn in the same order: a skipped sample is replaced by the next one of its own source.
    assert [s["task"] for s in dirty_samples] == [s["task"] for s in clean_samples]
    shares = Counter(s["task"] for s in dirty_samples)
    assert abs(shares["text_to_image"] / 48 - 0.5) < 0.15 and abs(shares["text"] / 48 - 0.2) < 0.12


def test_release_layout_is_readable(harmon_folder, tmp_path):
    from transformers import AutoProcessor

    (tmp_path / "images").mkdir()
    (tmp_path / "captions").mkdir()
    entries = []
    for index, (caption, image) in enumerate(caption_rows(4)):
        image.save(tmp_path / "images" / f"{index}.jpg")
        (tmp_path / "captions" / f"{index}.json").write_text(json.dumps({"caption": caption}))
        entries.append({"image": f"{index}.jpg", "annotation": f"{index}.json"})
    (tmp_path / "data_info.json").write_text(json.dumps(entries))
    recipe = Recipe.load("finetune", [f"model={harmon_folder}", f"output_dir={tmp_path / 'run'}", "image_size=64",
                                      f"data.0.path={tmp_path / 'data_info.json'}",
                                      f"data.0.image_folder={tmp_path / 'images'}",
                                      f"data.0.caption_folder={tmp_path / 'captions'}", "data.0.shuffle_buffer=0"])
    processor = AutoProcessor.from_pretrained(harmon_folder)
    samples = [s for s, _ in zip(build_training_stream(recipe, processor), range(4))]
    assert [s["task"] for s in samples] == ["text_to_image"] * 4
    assert all(len(s["image"]) == 64 * 64 * 3 for s in samples)


def test_lora_trains_only_adapters_and_exports_the_same_model(harmon_folder, data, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", three_task_sources(data),
                         learning_rates={"language_model": 1e-2, "mar_encoder": 1e-2, "mar_decoder": 1e-2},
                         lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "qkv"]})
    from harmon_hf.training import load_with_adapter

    adapter = train(recipe)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    from safetensors.torch import load_file

    trained = load_file(adapter / "adapter_model.safetensors")
    assert trained and all("lora_" in name for name in trained)
    assert any(t.abs().sum() > 0 for name, t in trained.items() if "lora_B" in name)  # B starts at zero

    base = HarmonForConditionalGeneration.from_pretrained(harmon_folder)
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(HarmonForConditionalGeneration.from_pretrained(harmon_folder), str(adapter))
    for name, parameter in adapted.named_parameters():
        if "lora_" not in name:
            original = base.get_parameter(name.replace("base_model.model.", "").replace(".base_layer", ""))
            assert torch.equal(parameter, original), name

    subprocess.run([sys.executable, "-m", "harmon_hf.cli", "export-lora", "--base", str(harmon_folder), "--adapter",
                    str(adapter), "--output", str(tmp_path / "merged")], check=True, capture_output=True)
    generated = subprocess.run([sys.executable, "-m", "harmon_hf.cli", "generate", "a red square", "--model",
                                str(harmon_folder), "--lora", str(adapter), "--size", "32", "--rounds", "2", "--steps",
                                "2", "-o", str(tmp_path / "lora.png")], capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr
    assert Image.open(tmp_path / "lora.png").size == (32, 32)
    merged = HarmonForConditionalGeneration.from_pretrained(tmp_path / "merged")
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = adapted(input_ids=input_ids).logits
        assert not torch.allclose(expected, base(input_ids=input_ids).logits, atol=1e-4)
        assert torch.allclose(merged(input_ids=input_ids).logits, expected, atol=1e-5)
        assert torch.allclose(load_with_adapter(base, adapter)(input_ids=input_ids).logits, expected, atol=1e-5)


def write_recipe(path, recipe_values):
    path.write_text(yaml.safe_dump(recipe_values))
    return path


def test_two_processes_with_accelerate_launch(harmon_folder, data, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", three_task_sources(data), training={"max_steps": 3})
    values = json.loads(json.dumps(recipe, default=lambda o: o.__dict__))
    path = write_recipe(tmp_path / "recipe.yaml", values)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
         "harmon_hf.cli", "train", str(path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "3 steps on 2 process(es)" in result.stdout
    model = HarmonForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    original = HarmonForConditionalGeneration.from_pretrained(harmon_folder)
    assert not torch.equal(model.model.mar_decoder.embed.weight, original.model.mar_decoder.embed.weight)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lerning_rate": 1}, r"unknown key\(s\) \['lerning_rate'\] in recipe"),
        ({"data": [{"path": "x.parquet", "task": "text", "ratio": 1.0, "colour": 1}]}, r"unknown key.*'colour'.*data\[0\]"),
        ({"data": [{"path": "a.parquet", "task": "text", "ratio": 0.5}, {"path": "b.parquet", "task": "text", "ratio": 0.3}]},
         "ratios must add up to 1, got 0.8"),
        ({"learning_rates": {"mar_decoder": 1e-4}}, "neither frozen nor given a learning rate"),
        ({"data": [{"path": "x.parquet", "task": "captioning", "ratio": 1.0}]}, "task must be one of"),
        ({"learning_rates": {**ALL_MODULES_LR, "proj_in": "fast"}}, "learning_rates.proj_in must be a number, got 'fast'"),
        ({"learning_rates": {**ALL_MODULES_LR, "proj_in": 0}}, "learning_rates.proj_in must be a positive number, got 0"),
        ({"learning_rates": "abc"}, "learning_rates must be a mapping, got 'abc'"),
        ({"image_size": 0}, "image_size must be a positive multiple of 16, got 0"),
        ({"image_size": "abc"}, "image_size must be a whole number, got 'abc'"),
        ({"image_size": 256.5}, "image_size must be a whole number, got 256.5"),
        ({"data": 5}, "data must be a list, got 5"),
        ({"data": [5]}, r"data\[0\] must be a mapping, got 5"),
        ({"data": [{"path": "x.parquet", "task": "text", "ratio": "half"}]}, r"data\[0\].ratio must be a number, got 'half'"),
        ({"frozen": "language_model"}, "frozen must be a list, got 'language_model'"),
        ({"loss_weights": {"text": True}}, "loss_weights.text must be a number, got True"),
        ({"training": 3}, "training must be a mapping, got 3"),
        ({"lora": {"r": 1.5}}, "lora.r must be a whole number, got 1.5"),
    ],
)
def test_bad_recipes_are_refused(harmon_folder, tmp_path, change, message):
    values = {"model": str(harmon_folder), "output_dir": str(tmp_path / "run"), "learning_rates": dict(ALL_MODULES_LR),
              "data": [{"path": "x.parquet", "task": "text", "ratio": 1.0}], **change}
    with pytest.raises(ValueError, match=message):
        from_dict(Recipe, values, "recipe")


def test_unopenable_dataset_is_refused_before_any_compute(harmon_folder, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", [{"path": str(tmp_path / "missing.parquet"),
                                                            "task": "text", "ratio": 1.0}])
    with pytest.raises(ValueError, match="cannot open data source .*missing.parquet"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def cli_recipe(harmon_folder, data, tmp_path):
    """A recipe file that trains the tiny model on the tiny text data, and a broken one beside it."""
    (tmp_path / "broken.yaml").write_text(f"model: {harmon_folder}\ndata: [\n  - {{path: x}}\nimage_size: 64\n")
    values = json.loads(json.dumps(make_recipe(harmon_folder, tmp_path / "run", [
        {"path": str(data["text"]), "task": "text", "ratio": 1.0, "shuffle_buffer": 0}]), default=lambda o: o.__dict__))
    return write_recipe(tmp_path / "recipe.yaml", values)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["broken.yaml"], r"recipe .*broken.yaml is not valid YAML: .* \(line 3, column 3\)"),
        (["recipe.yaml", "data.5.ratio=1"], r"override 'data.5.ratio=1': data is a list of length 1: the index must "
                                            r"be 0 to 0, got '5'"),
        (["recipe.yaml", "image_size=abc"], "image_size must be a whole number, got 'abc'"),
        (["recipe.yaml", "image_size=0"], "image_size must be a positive multiple of 16, got 0"),
        (["recipe.yaml", "learning_rates=abc"], "learning_rates must be a mapping, got 'abc'"),
        (["recipe.yaml", "data=5"], "data must be a list, got 5"),
        (["recipe.yaml", "model={tmp_path}/no-such-model"], "cannot load model '.*no-such-model': no such folder"),
    ],
)
def test_cli_refuses_a_bad_recipe_in_one_line(harmon_folder, data, tmp_path, arguments, message):
    cli_recipe(harmon_folder, data, tmp_path)
    result = run_harmon("train", tmp_path / arguments[0], *(a.format(tmp_path=tmp_path) for a in arguments[1:]),
                        timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("harmon train: error: "), result.stderr[-3000:]
    assert re.search(message, result.stderr) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.0.text_column=nope"], r"data source '.*text.jsonl' has no usable sample in its 32 rows: empty text: 32"),
        (["data.0.format=shapes", "data.0.path=train", "data.0.text_column=nope"],  # endless: it used to spin forever
         r"data source 'train' gave 1000 unusable samples in a row: empty text: 1000"),
    ],
)
def test_cli_refuses_a_source_without_a_usable_sample_before_any_compute(harmon_folder, data, tmp_path, overrides,
                                                                         message):
    result = run_harmon("train", cli_recipe(harmon_folder, data, tmp_path), *overrides, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(f"harmon train: error: {message}", result.stderr.splitlines()[-1]), result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_source_that_turns_unusable_stops_the_run(harmon_folder, tmp_path, monkeypatch):
    from datasets import IterableDataset

    from harmon_hf.training import data as data_module

    def rows():  # one good row, then bad ones: endless as far as the run can tell
        yield {"text": "a red square"}
        for _ in range(20000):
            yield {"text": ""}
        raise RuntimeError("the run read on through 20000 unusable samples")  # this test's bound, instead of a hang

    monkeypatch.setattr(data_module, "open_source", lambda source, seed="0": IterableDataset.from_generator(rows))
    recipe = make_recipe(harmon_folder, tmp_path / "run", [{"path": "endless", "task": "text", "ratio": 1.0,
                                                            "shuffle_buffer": 0}])
    with pytest.raises(ValueError, match="data source 'endless' gave 1000 unusable samples in a row: empty text: 1000"):
        train(recipe)
    assert not (tmp_path / "run" / "final").exists()


def test_a_run_without_a_step_is_not_a_success(harmon_folder, data, tmp_path, monkeypatch):
    from datasets import IterableDataset

    from harmon_hf.training import run as run_module

    def nothing():
        yield from ()

    # Past the checks of the sources a stream can still give nothing; such a run must not report success.
    monkeypatch.setattr(run_module, "build_training_stream", lambda *args: IterableDataset.from_generator(nothing))
    recipe = make_recipe(harmon_folder, tmp_path / "run", [{"path": str(data["text"]), "task": "text", "ratio": 1.0}])
    with pytest.raises(ValueError, match="training took no step: the data gave no batch of 4 sample"):
        train(recipe)
    assert not (tmp_path / "run" / "final").exists()


def test_a_kill_while_saving_keeps_the_last_complete_checkpoint(harmon_folder, data, tmp_path, monkeypatch):
    from harmon_hf.training.trainer import CHECKPOINT_COMPLETE, latest_complete_checkpoint

    class Killed(Exception):
        pass

    touch = Path.touch

    def touch_or_die(path, *args, **kwargs):  # the process dies right before checkpoint-2 is marked complete
        if path.name == CHECKPOINT_COMPLETE and path.parent.name == "checkpoint-2":
            raise Killed
        return touch(path, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", touch_or_die)
    recipe = make_recipe(harmon_folder, tmp_path / "run", three_task_sources(data),
                         training={"max_steps": 2, "save_steps": 1, "save_total_limit": 1})
    with pytest.raises(Killed):
        train(recipe)
    assert latest_complete_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-1"
    monkeypatch.undo()
    train(recipe, resume=True)
    # Once checkpoint-2 is complete, the limit of one removes checkpoint-1.
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    assert latest_complete_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-2"


def test_cli_refuses_a_bad_override_in_one_line(harmon_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "harmon_hf.cli", "train", "stage1", "trainng.max_steps=3"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "unknown key(s) ['trainng']" in result.stderr


def test_overrides_and_files_read_exponent_numbers_as_numbers(harmon_folder, tmp_path):
    """`2e-4` is a string in YAML 1.1 (PyYAML); a recipe reads it as the number its writer meant."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"model": str(harmon_folder), "output_dir": str(tmp_path / "run"),
                                           "learning_rates": ALL_MODULES_LR,
                                           "data": [{"path": "x.parquet", "task": "text", "ratio": 1.0}]})
                           + "weight_decay: 1e-2\n")
    recipe = Recipe.load(recipe_file, ["learning_rates.mar_decoder=2e-4", "training.learning_rate=-3E+1"])
    assert recipe.weight_decay == 0.01 and recipe.learning_rates["mar_decoder"] == 0.0002
    assert recipe.training["learning_rate"] == -30.0
    assert Recipe.load(recipe_file, ["output_dir=2e4x"]).output_dir == "2e4x"


def test_bundled_recipes_carry_the_papers_settings():
    stage1, stage2, stage3 = (Recipe.load(name) for name in ("stage1", "stage2", "stage3"))
    assert stage1.frozen == ["language_model"] and stage1.learning_rates["mar_decoder"] == 1e-4
    assert stage1.learning_rates["mar_encoder"] == 1e-5 and stage1.image_size == 256
    assert stage2.learning_rates["language_model"] == 1e-5 and stage2.learning_rates["mar_decoder"] == 1e-4
    assert stage3.learning_rates["mar_decoder"] == 2e-5 and stage3.learning_rates["language_model"] == 2e-6
    assert stage3.image_size == 512

    def ratios(recipe):
        by_task = Counter()
        for source in recipe.data:
            by_task[source.task] += source.ratio
        return [round(by_task[t] / min(v for v in by_task.values() if v), 1) for t in ("text", "image_to_text", "text_to_image")]

    assert ratios(stage1) == [0, 1, 2] and ratios(stage2) == [1, 3, 8] and ratios(stage3) == [1, 3, 16]
    for recipe in (stage1, stage2, stage3):
        assert recipe.training["max_steps"] == 50000 and recipe.weight_decay == 0.02
    decoder_only = Recipe.load("finetune_decoder_only")
    assert list(decoder_only.learning_rates) == ["mar_decoder"]
    assert set(Recipe.load("finetune").learning_rates.values()) == {1e-5}
    assert Recipe.load("lora").lora.target_modules[0] == "q_proj"


def test_every_bad_sample_rule(harmon_folder, tmp_path):
    from transformers import AutoProcessor

    from harmon_hf.training.data import SampleBuilder

    processor = AutoProcessor.from_pretrained(harmon_folder)
    source = from_dict(__import__("harmon_hf.training.recipe", fromlist=["DataSource"]).DataSource,
                       {"path": str(tmp_path), "task": "text_to_image", "ratio": 1.0}, "source")
    recipe = make_recipe(harmon_folder, tmp_path, [{"path": str(tmp_path), "task": "text_to_image", "ratio": 1.0}])
    builder = SampleBuilder(recipe, source, 0, processor)
    good = caption_rows(1)[0][1]
    cases = {
        "tiny image: 6x40": {"text": "a red square", "image": Image.new("RGB", (6, 40))},
        "extreme aspect ratio: 400x30": {"text": "a red square", "image": Image.new("RGB", (400, 30))},
        "empty text": {"text": "   ", "image": good},
        "over-long text: more than 64 tokens": {"text": "word " * 200, "image": good},
        "no image": {"text": "a red square", "image": None},
    }
    for reason, row in cases.items():
        assert builder(row, 0)["skip_reason"] == reason
    kept = builder({"text": "a red square", "image": good}, 1)
    assert kept["skip_reason"] == "" and kept["skipped_before"] == list(cases)


def test_image_folder_and_webdataset_sources(harmon_folder, tmp_path):
    import tarfile
    from io import BytesIO

    from transformers import AutoProcessor

    folder = tmp_path / "folder"
    folder.mkdir()
    rows = caption_rows(4)
    for index, (caption, image) in enumerate(rows):
        image.save(folder / f"{index}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                   for i, (c, _) in enumerate(rows)))
    with tarfile.open(tmp_path / "shard-0000.tar", "w") as tar:
        for index, (caption, image) in enumerate(rows):
            for suffix, payload in (("png", None), ("txt", caption.encode())):
                if payload is None:
                    buffer = BytesIO()
                    image.save(buffer, format="PNG")
                    payload = buffer.getvalue()
                info = tarfile.TarInfo(f"{index:04d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, BytesIO(payload))
    processor = AutoProcessor.from_pretrained(harmon_folder)
    for source in ({"path": str(folder), "task": "text_to_image", "ratio": 1.0},
                   {"path": str(tmp_path / "shard-0000.tar"), "task": "image_to_text", "image_column": "png",
                    "text_column": "txt", "ratio": 1.0}):
        recipe = make_recipe(harmon_folder, tmp_path / "run", [source])
        samples = [s for s, _ in zip(build_training_stream(recipe, processor), range(4))]
        assert len(samples) == 4 and all(s["task"] == source["task"] and s["image"] for s in samples)


def test_bfloat16_mixed_precision_on_the_cpu_trains(harmon_folder, data, tmp_path):
    """`training.bf16: true` on a CPU: the Trainer's own switch (autocast to bfloat16), with float32 weights."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(harmon_folder)
    runs = {}
    for bf16, steps in ((False, 1), (True, 30)):  # float32 only for its first loss
        recipe = make_recipe(harmon_folder, tmp_path / f"bf16-{bf16}", three_task_sources(data),
                             training={"max_steps": steps, "bf16": bf16})
        runs[bf16] = (recipe, train(recipe))
    recipe, final = runs[True]
    samples = [sample for sample, _ in zip(build_training_stream(recipe, processor), range(24))]
    collator = HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor, 64)
    before = fixed_task_losses(HarmonForConditionalGeneration.from_pretrained(harmon_folder), collator, samples)
    trained = HarmonForConditionalGeneration.from_pretrained(final)
    assert trained.dtype == torch.float32  # mixed precision computes in bfloat16 and keeps the weights in float32
    after = fixed_task_losses(trained, collator, samples)
    for task in before:
        assert after[task] < 0.9 * before[task], (task, before[task], after[task])
    # The switch took effect: the same run in float32 computes other losses.
    assert log_history(tmp_path / "bf16-True")[0]["loss"] != log_history(tmp_path / "bf16-False")[0]["loss"]
