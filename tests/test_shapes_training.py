"""Harmon-Shapes' training chain: `harmon shapes init`, then the bundled shapes recipes through `harmon train`."""

import subprocess
import sys
from collections import Counter

import torch
from safetensors.torch import load_file

from harmon_hf.training import Recipe

STAGES = ("stage0_language", "stage1", "stage2", "stage3")


def harmon(*args):
    result = subprocess.run([sys.executable, "-m", "harmon_hf.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def language_model_weights(folder):
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if ".language_model." in k}


def test_shapes_recipes_follow_the_papers_three_stages():
    recipes = {name: Recipe.load(f"shapes/{name}") for name in STAGES}

    def ratios(recipe):
        by_task = Counter()
        for source in recipe.data:
            assert source.format == "shapes" and source.path == "train"  # never the held-out split
            by_task[source.task] += source.ratio
        smallest = min(v for v in by_task.values() if v)
        return [round(by_task[t] / smallest, 1) for t in ("text", "image_to_text", "text_to_image")]

    assert ratios(recipes["stage0_language"]) == [1, 0, 0]
    assert recipes["stage1"].frozen == ["language_model"] and ratios(recipes["stage1"]) == [0, 1, 2]
    assert recipes["stage2"].frozen == [] and ratios(recipes["stage2"]) == [1, 3, 8]
    assert ratios(recipes["stage3"]) == [1, 3, 16]
    assert all(recipes["stage3"].learning_rates[m] < recipes["stage2"].learning_rates[m] for m in recipes["stage2"].learning_rates)
    chain = [recipes[name] for name in STAGES]
    for before, after in zip(chain, chain[1:]):  # each stage starts from the previous one's output
        assert after.model == f"{before.output_dir}/final"


def test_init_and_every_stage_run_through_harmon_train(tmp_path):
    harmon("shapes", "init", "--output", tmp_path / "init", "--vae-steps", "3")
    previous = tmp_path / "init"
    for stage in STAGES:
        harmon("train", f"shapes/{stage}", f"model={previous}", f"output_dir={tmp_path / stage}",
               "training.max_steps=2", "training.per_device_train_batch_size=4", "training.logging_steps=1")
        previous = tmp_path / stage / "final"
    before, after = (language_model_weights(tmp_path / name / "final") for name in ("stage0_language", "stage1"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # stage I keeps the LLM frozen
    stage2 = language_model_weights(tmp_path / "stage2" / "final")
    assert any(not torch.equal(after[k], stage2[k]) for k in after)  # stage II trains it
    log = (tmp_path / "stage2" / "trainer_state.json").read_text()
    assert "loss_text_to_image" in log and "loss_image_to_text" in log
