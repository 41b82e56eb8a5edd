"""FSDP2 on CPUs: `accelerate launch --config_file training/accelerate/fsdp.yaml` with two gloo processes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.training import train
from test_training import ALL_MODULES_LR, log_history, make_recipe, three_task_sources, write_recipe
from tiny_data import write_caption_parquet, write_conversation_jsonl, write_text_jsonl

FSDP_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "training", "accelerate", "fsdp.yaml")
CONSTANT = {"lr_scheduler_type": "constant", "warmup_steps": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-data")
    # Texts of one token count each, so that a mean over one process's samples averaged over the processes is the
    # mean over all the samples (what one process with the whole batch computes).
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{a}{b} red square circle"}) + "\n"
                             for a in range(10) for b in range(10)))
    return {"parquet": write_caption_parquet(root / "captions.parquet"),
            "conversations": write_conversation_jsonl(root / "conversations"),
            "text": write_text_jsonl(root / "text.jsonl"), "texts": texts}


def launch_fsdp(recipe, tmp_path, *options):
    values = json.loads(json.dumps(recipe, default=lambda o: o.__dict__))
    path = write_recipe(tmp_path / f"{os.path.basename(recipe.output_dir)}.yaml", values)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "2",
         "-m", "harmon_hf.cli", "train", str(path), *options],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(folder) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history(folder) if "loss" in entry}


def test_two_fsdp_processes_train_as_one_process_with_their_global_batch(harmon_folder, data, tmp_path):
    processor = AutoProcessor.from_pretrained(harmon_folder)
    counts = {len(processor.tokenizer(json.loads(line)["text"])["input_ids"])
              for line in data["texts"].read_text().splitlines()}
    assert len(counts) == 1  # the condition under which the two means are one
    sources = [{"path": str(data["texts"]), "task": "text", "ratio": 1.0, "shuffle_buffer": 0}]
    frozen = ["mar_encoder", "mar_decoder", "diffusion_head", "proj_in", "proj_out"]
    settings = dict(frozen=frozen, learning_rates={"language_model": 1e-3})
    fsdp = make_recipe(harmon_folder, tmp_path / "fsdp", sources, **settings,
                       training={**CONSTANT, "max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3})
    result = launch_fsdp(fsdp, tmp_path)
    assert "6 steps on 2 process(es)" in result.stdout
    # FSDP, not DDP: the checkpoint holds the processes' shards (accelerate's FSDP checkpoint layout).
    assert (tmp_path / "fsdp" / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir()
    one = make_recipe(harmon_folder, tmp_path / "one", sources, **settings,
                      training={**CONSTANT, "max_steps": 6, "per_device_train_batch_size": 8})
    train(one)
    # Processes 0 and 1 take the even and odd samples, so their batches of 4 are one process's batch of 8. The sums
    # are taken in another order (per process, then between processes), so float32 rounding differs: 1e-5 relative
    # is well above it (the losses start near 6) and far below one step's change (more than 1e-2).
    expected, actual = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert expected.keys() == actual.keys() == set(range(1, 7))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5), step
    assert actual[6] < actual[1] - 0.1

    final = tmp_path / "fsdp" / "final"
    trained = HarmonForConditionalGeneration.from_pretrained(final).state_dict()
    original = HarmonForConditionalGeneration.from_pretrained(harmon_folder).state_dict()
    single = HarmonForConditionalGeneration.from_pretrained(tmp_path / "one" / "final").state_dict()
    assert trained.keys() == original.keys()
    for name, tensor in original.items():
        frozen_module = not name.startswith(("model.language_model.", "lm_head."))
        assert torch.equal(trained[name], tensor) == frozen_module, name
    # The weights follow the same path: Adam divides by the gradients' own size, so their rounding shows more in
    # the weights than in the losses, but stays a small part of what training changed.
    change = max((single[name] - tensor).abs().max() for name, tensor in original.items())
    gap = max((trained[name] - single[name]).abs().max() for name in original)
    assert gap < 0.05 * change, (gap, change)
    one_final = tmp_path / "one" / "final"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json"):
        assert (final / name).read_text() == (one_final / name).read_text(), name
    model = AutoModel.from_pretrained(final, trust_remote_code=True)  # a normal model folder, remote code included
    prompt = processor.tokenizer("red square", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


def test_fsdp_with_every_task_resumes_exactly(harmon_folder, data, tmp_path):
    sources = three_task_sources(data)
    straight = make_recipe(harmon_folder, tmp_path / "straight", sources, frozen=["mar_encoder"],
                           learning_rates={k: v for k, v in ALL_MODULES_LR.items() if k != "mar_encoder"},
                           training={**CONSTANT, "max_steps": 4, "save_steps": 2})
    launch_fsdp(straight, tmp_path)
    resumed = make_recipe(harmon_folder, tmp_path / "resumed", sources, frozen=["mar_encoder"],
                          learning_rates={k: v for k, v in ALL_MODULES_LR.items() if k != "mar_encoder"},
                          training={**CONSTANT, "max_steps": 4, "save_steps": 2})
    resumed.training["max_steps"] = 2
    launch_fsdp(resumed, tmp_path)
    resumed.training["max_steps"] = 4
    launch_fsdp(resumed, tmp_path, "--resume")
    history = [entry for entry in log_history(tmp_path / "straight") if "loss" in entry]
    assert all(any(f"loss_{task}" in entry for entry in history) for task in ("text_to_image", "image_to_text", "text"))
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    expected = HarmonForConditionalGeneration.from_pretrained(tmp_path / "straight" / "final").state_dict()
    actual = HarmonForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
