"""Sharded training on CPUs: `accelerate launch --config_file training/accelerate/{fsdp,zero2,zero3}.yaml` with two
gloo processes (FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on DeepSpeed's CPU accelerator)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.training import load_with_adapter, train
from test_training import ALL_MODULES_LR, log_history, make_recipe, three_task_sources, write_recipe
from tiny_data import write_caption_parquet, write_conversation_jsonl, write_text_jsonl

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "accelerate"
# The folder in which each strategy's checkpoints keep the processes' shards (what --resume reads).
SHARDS = {"fsdp.yaml": "pytorch_model_fsdp_0", "zero2.yaml": "global_step3", "zero3.yaml": "global_step3"}
CONSTANT = {"lr_scheduler_type": "constant", "warmup_steps": 0}
LANGUAGE_MODEL_ONLY = dict(frozen=["mar_encoder", "mar_decoder", "diffusion_head", "proj_in", "proj_out"],
                           learning_rates={"language_model": 1e-3})
ALL_BUT_MAR_ENCODER = dict(frozen=["mar_encoder"],
                           learning_rates={k: v for k, v in ALL_MODULES_LR.items() if k != "mar_encoder"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded-data")
    # Texts of one token count each, so that a mean over one process's samples averaged over the processes is the
    # mean over all the samples (what one process with the whole batch computes).
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{a}{b} red square circle"}) + "\n"
                             for a in range(10) for b in range(10)))
    return {"parquet": write_caption_parquet(root / "captions.parquet"),
            "conversations": write_conversation_jsonl(root / "conversations"),
            "text": write_text_jsonl(root / "text.jsonl"), "texts": texts}


def text_sources(data):
    return [{"path": str(data["texts"]), "task": "text", "ratio": 1.0, "shuffle_buffer": 0}]


def launch(config, recipe, tmp_path, *options, accelerate_options=(), check=True):
    values = json.loads(json.dumps(recipe, default=lambda o: o.__dict__))
    path = write_recipe(tmp_path / f"{os.path.basename(recipe.output_dir)}.yaml", values)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
         "--num_processes", "2", *accelerate_options, "-m", "harmon_hf.cli", "train", str(path), *options],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def losses(folder) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history(folder) if "loss" in entry}


def weights(folder) -> dict[str, torch.Tensor]:
    return HarmonForConditionalGeneration.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def one_process(harmon_folder, data, tmp_path_factory) -> Path:
    """One process with the global batch of 8: what two processes with 4 each should train like."""
    output = tmp_path_factory.mktemp("one-process") / "run"
    train(make_recipe(harmon_folder, output, text_sources(data), **LANGUAGE_MODEL_ONLY,
                      training={**CONSTANT, "max_steps": 6, "per_device_train_batch_size": 8}))
    return output


@pytest.mark.parametrize("config", ["fsdp.yaml", "zero2.yaml", "zero3.yaml"])
def test_two_processes_train_as_one_process_with_their_global_batch(config, harmon_folder, data, one_process,
                                                                     tmp_path):
    processor = AutoProcessor.from_pretrained(harmon_folder)
    counts = {len(processor.tokenizer(json.loads(line)["text"])["input_ids"])
              for line in data["texts"].read_text().splitlines()}
    assert len(counts) == 1  # the condition under which the two means are one
    run = make_recipe(harmon_folder, tmp_path / "run", text_sources(data), **LANGUAGE_MODEL_ONLY,
                      training={**CONSTANT, "max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3})
    result = launch(config, run, tmp_path)
    assert "6 steps on 2 process(es)" in result.stdout
    assert result.stdout.count("Saved the trained model") == 1  # the main process speaks for both
    # The strategy really ran: the checkpoint holds the processes' shards in the strategy's own layout.
    assert (tmp_path / "run" / "checkpoint-3" / SHARDS[config]).is_dir()
    # Processes 0 and 1 take the even and odd samples, so their batches of 4 are one process's batch of 8. The sums
    # are taken in another order (per process, then between processes), so float32 rounding differs: 1e-5 relative
    # is well above it (the losses start near 6) and far below one step's change (more than 1e-2).
    expected, actual = losses(one_process), losses(tmp_path / "run")
    assert expected.keys() == actual.keys() == set(range(1, 7))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), step
    assert actual[6] < actual[1] - 0.1

    final = tmp_path / "run" / "final"
    trained, original, single = weights(final), weights(harmon_folder), weights(one_process / "final")
    assert trained.keys() == original.keys()
    for name, tensor in original.items():
        frozen_module = not name.startswith(("model.language_model.", "lm_head."))
        assert torch.equal(trained[name], tensor) == frozen_module, name
    # The weights follow the same path: Adam divides by the gradients' own size, so their rounding shows more in
    # the weights than in the losses, but stays a small part of what training changed.
    change = max((single[name] - tensor).abs().max() for name, tensor in original.items())
    gap = max((trained[name] - single[name]).abs().max() for name in original)
    assert gap < 0.05 * change, (gap, change)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json"):
        assert (final / name).read_text() == (one_process / "final" / name).read_text(), name
    model = AutoModel.from_pretrained(final, trust_remote_code=True)  # a normal model folder, remote code included
    prompt = processor.tokenizer("red square", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


def every_task_recipe(harmon_folder, data, output_dir):
    return make_recipe(harmon_folder, output_dir, three_task_sources(data), **ALL_BUT_MAR_ENCODER,
                       training={**CONSTANT, "max_steps": 4, "save_steps": 2})


@pytest.fixture(scope="module")
def every_task_runs(harmon_folder, data, tmp_path_factory):
    """Uninterrupted two-process runs with every task, one per strategy, made when first asked for."""
    runs = {}

    def run(config):
        if config not in runs:
            root = tmp_path_factory.mktemp(config.replace(".yaml", ""))
            launch(config, every_task_recipe(harmon_folder, data, root / "straight"), root)
            runs[config] = root / "straight"
        return runs[config]

    return run


@pytest.mark.parametrize("config", ["fsdp.yaml", "zero2.yaml"])
def test_every_task_resumes_exactly(config, harmon_folder, data, every_task_runs, tmp_path):
    straight = every_task_runs(config)
    history = [entry for entry in log_history(straight) if "loss" in entry]
    assert all(any(f"loss_{task}" in entry for entry in history) for task in ("text_to_image", "image_to_text", "text"))
    resumed = every_task_recipe(harmon_folder, data, tmp_path / "resumed")
    resumed.training["max_steps"] = 2
    launch(config, resumed, tmp_path)
    resumed.training["max_steps"] = 4
    launch(config, resumed, tmp_path, "--resume")
    assert losses(straight) == losses(tmp_path / "resumed")
    expected, actual = weights(straight / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_fsdp_activation_checkpointing_recomputes_the_same_training(harmon_folder, data, every_task_runs, tmp_path):
    # FSDP's own switch, as users set it in their accelerate config; HarmonTrainer routes it to the model's
    # checkpointing (accelerate's wrapper fails on the diffusion head). Recomputed activations are the stored ones.
    launch("fsdp.yaml", every_task_recipe(harmon_folder, data, tmp_path / "checkpointed"), tmp_path,
           accelerate_options=("--fsdp_activation_checkpointing", "true"))
    expected, actual = losses(every_task_runs("fsdp.yaml")), losses(tmp_path / "checkpointed")
    assert expected.keys() == actual.keys()
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), step


def test_fsdp_bfloat16_mixed_precision_follows_float32(harmon_folder, data, every_task_runs, tmp_path):
    launch("fsdp.yaml", every_task_recipe(harmon_folder, data, tmp_path / "bf16"), tmp_path,
           accelerate_options=("--mixed_precision", "bf16"))
    expected, actual = losses(every_task_runs("fsdp.yaml")), losses(tmp_path / "bf16")
    assert expected.keys() == actual.keys()
    assert any(actual[step] != expected[step] for step in expected)  # the products really ran in bfloat16
    # bfloat16 rounds each value by up to 2**-8 relative; the losses, means over many values, move much less
    # (5e-4 relative seen here), so 1e-2 catches a run that trains differently rather than rounding differently.
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-2), step
    assert weights(tmp_path / "bf16" / "final")["model.mar_decoder.embed.weight"].dtype == torch.float32


@pytest.mark.parametrize("config", ["fsdp.yaml", "zero2.yaml"])
def test_lora_saves_the_adapter_one_process_would(config, harmon_folder, data, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    settings = dict(lora=lora, learning_rates={"language_model": 1e-3}, frozen=LANGUAGE_MODEL_ONLY["frozen"])
    launch(config, make_recipe(harmon_folder, tmp_path / "two", text_sources(data), **settings,
                               training={**CONSTANT, "max_steps": 4, "per_device_train_batch_size": 4}), tmp_path)
    train(make_recipe(harmon_folder, tmp_path / "one", text_sources(data), **settings,
                      training={**CONSTANT, "max_steps": 4, "per_device_train_batch_size": 8}))
    two, one = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("two", "one"))
    assert two.keys() == one.keys() and any("lora_B" in name for name in one)
    # lora_B starts at zero, so what it holds is what training changed; the two runs' rounding is a small part of it.
    change = max(tensor.abs().max() for name, tensor in one.items() if "lora_B" in name)
    assert max((two[name] - one[name]).abs().max() for name in one) < 0.05 * change
    adapted = load_with_adapter(HarmonForConditionalGeneration.from_pretrained(harmon_folder), tmp_path / "two" / "adapter")
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(adapted.state_dict()[name], weights(harmon_folder)[name])  # the adapter merges in


def test_sources_that_do_not_split_evenly_keep_the_processes_in_step(harmon_folder, tmp_path):
    # 7 texts and 5 captions: split naively, one process would have 4 and 3 of them per pass and the other 3 and 2,
    # so their passes would end at different steps and the next pass would give them different tasks at the same
    # step, whose modules FSDP gathers with every process: one would wait for the other forever.
    texts = tmp_path / "seven.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{n} red square circle"}) + "\n" for n in range(7)))
    sources = [{"path": str(texts), "task": "text", "ratio": 0.5, "shuffle_buffer": 0},
               {"path": str(write_caption_parquet(tmp_path / "five.parquet", count=5)), "task": "text_to_image",
                "ratio": 0.5, "shuffle_buffer": 0}]
    run = make_recipe(harmon_folder, tmp_path / "run", sources, **LANGUAGE_MODEL_ONLY,
                      training={**CONSTANT, "max_steps": 16, "per_device_train_batch_size": 1})
    launch("fsdp.yaml", run, tmp_path)
    assert losses(tmp_path / "run").keys() == set(range(1, 17))


def test_full_state_dict_checkpoints_are_refused_before_any_compute(harmon_folder, data, tmp_path):
    config = tmp_path / "fsdp-full.yaml"
    config.write_text((CONFIGS / "fsdp.yaml").read_text().replace("SHARDED_STATE_DICT", "FULL_STATE_DICT"))
    run = make_recipe(harmon_folder, tmp_path / "run", text_sources(data), **LANGUAGE_MODEL_ONLY)
    result = launch(config, run, tmp_path, check=False)
    assert result.returncode != 0
    assert "harmon train: error: fsdp_state_dict_type FULL_STATE_DICT: --resume from its checkpoints hangs" in result.stderr
    assert not (tmp_path / "run" / "trainer_state.json").exists()
