"""How `harmon train` fails: divergence, a full disk, a tampered checkpoint and impossible settings, each reported in
one line, without a final model that is not whole and finite."""

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from harmon_hf.cli import main
from harmon_hf.training import train
from harmon_hf.training.recipe import Recipe, from_dict
from harmon_hf.training.trainer import CHECKPOINT_COMPLETE, latest_complete_checkpoint, writing
from tiny_data import write_text_jsonl

DIVERGING_RATES = {name: 1e8 for name in ("language_model", "mar_encoder", "mar_decoder", "diffusion_head",
                                          "proj_in", "proj_out")}
# At 1e8 the tiny model's loss grows to ~1e8 within 4 steps and overflows within a few more; how soon depends on the
# kernels' rounding (the thread count), so the runs have room for it.
DIVERGING_STEPS = 10
GENTLE_RATES = {name: 1e-3 for name in DIVERGING_RATES}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_jsonl(tmp_path_factory.mktemp("text") / "text.jsonl")


def recipe_values(harmon_folder, text_data, output_dir, rates=GENTLE_RATES, **training) -> dict:
    """A recipe of a few steps on the tiny model and the tiny text data, as a mapping."""
    return {
        "model": str(harmon_folder), "output_dir": str(output_dir), "image_size": 64, "max_text_tokens": 64,
        "learning_rates": dict(rates),
        "data": [{"path": str(text_data), "task": "text", "ratio": 1.0, "shuffle_buffer": 0}],
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 1000,
                     "disable_tqdm": True, **training},
    }


def recipe_file(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def log_history(output_dir: Path) -> list[dict]:
    return [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def error_line(capsys) -> str:
    """The last line on stderr (progress bars of loading may come before it), with no traceback."""
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and stderr.endswith("\n"), stderr[-3000:]
    return stderr.splitlines()[-1]


@contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes fail as on a full disk (EFBIG; Python ignores SIGXFSZ), in this process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def disk_full_in(monkeypatch, folder_name: str):
    """The weights of a save into a folder named `folder_name` are written as if the disk were full."""
    from transformers import modeling_utils

    real_save = modeling_utils.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name != folder_name:
            return real_save(tensors, filename, *args, **kwargs)
        with file_size_limit(100_000):
            return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save)


# -- a run that diverges -----------------------------------------------------------------------------------------


def test_a_diverging_run_stops_in_one_line_without_a_final_model(harmon_folder, text_data, tmp_path, capsys):
    path = recipe_file(tmp_path / "recipe.yaml", recipe_values(harmon_folder, text_data, tmp_path / "run",
                                                               DIVERGING_RATES, max_steps=DIVERGING_STEPS))
    assert main(["train", str(path)]) == 1
    message = error_line(capsys)
    assert re.fullmatch(r"harmon train: error: non-finite (loss|gradient norm)( and gradient norm)? at step \d+ "
                        r"\(loss \S+, gradient norm \S+\): training stopped without saving a final model; lower the "
                        r"learning rates, or set training.on_nonfinite=skip to skip such steps", message), message
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "final.incomplete").exists()


def test_skip_mode_leaves_the_weights_of_nonfinite_steps_untouched_and_counts_them(harmon_folder, text_data, tmp_path,
                                                                                   capsys):
    values = recipe_values(harmon_folder, text_data, tmp_path / "run", DIVERGING_RATES, on_nonfinite="skip",
                           max_steps=DIVERGING_STEPS, save_steps=1, save_total_limit=None)
    final = train(from_dict(Recipe, values, "recipe"))
    logs = log_history(tmp_path / "run")
    nonfinite = [entry["step"] for entry in logs
                 if not (math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]))]
    assert nonfinite and logs[-1]["skipped_steps"] == len(nonfinite)
    assert [entry["skipped_steps"] for entry in logs] == [sum(s <= entry["step"] for s in nonfinite) for entry in logs]
    assert f"skipped {len(nonfinite)} optimizer step(s) for a non-finite loss or gradient" in capsys.readouterr().out

    def weights(folder):
        return load_file(folder / "model.safetensors")

    for step in nonfinite:  # a skipped step changes nothing: no update, no weight decay
        before, after = (weights(tmp_path / "run" / f"checkpoint-{s}") for s in (step - 1, step))
        assert all(torch.equal(before[name], after[name]) for name in before), step
    assert all(torch.isfinite(tensor).all() for tensor in weights(final).values())


def test_a_nan_loss_is_logged_as_nan_not_as_zero(harmon_folder, text_data, tmp_path, monkeypatch):
    from harmon_hf.training import run as run_module

    real_load_model = run_module.load_model

    def load_model_that_turns_nan_at_step_2(recipe):
        model = real_load_model(recipe)
        calls = []

        def poison(module, inputs, output):  # the embeddings of the second batch turn NaN, as in an overflow
            calls.append(1)
            return output * float("nan") if len(calls) == 2 else output

        model.model.language_model.get_input_embeddings().register_forward_hook(poison)
        return model

    monkeypatch.setattr(run_module, "load_model", load_model_that_turns_nan_at_step_2)
    train(from_dict(Recipe, recipe_values(harmon_folder, text_data, tmp_path / "run", max_steps=3,
                                          on_nonfinite="skip"), "recipe"))
    logs = log_history(tmp_path / "run")
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert math.isnan(logs[1]["loss"]) and math.isnan(logs[1]["loss_text"]) and math.isnan(logs[1]["grad_norm"])
    assert all(math.isfinite(logs[i][key]) for i in (0, 2) for key in ("loss", "loss_text", "grad_norm"))
    assert [entry["skipped_steps"] for entry in logs] == [0, 1, 1]


def test_nonfinite_weights_are_never_saved_as_a_final_model(harmon_folder, text_data, tmp_path, monkeypatch):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from harmon_hf.training import run as run_module

    real_load_model = run_module.load_model
    models, steps = [], []

    def load_model(recipe):
        models.append(real_load_model(recipe))
        return models[-1]

    def overflow_at_step_2(optimizer, args, kwargs):  # after the step's checks of its loss and gradient
        steps.append(optimizer)
        if len(steps) == 2:
            models[0].model.proj_out.linear_1.weight.data[0, 0] = float("inf")

    monkeypatch.setattr(run_module, "load_model", load_model)
    recipe = from_dict(Recipe, recipe_values(harmon_folder, text_data, tmp_path / "run", max_steps=2), "recipe")
    hook = register_optimizer_step_post_hook(overflow_at_step_2)
    try:
        with pytest.raises(ValueError, match=r"refusing to save the final model: 1 weight tensor\(s\) hold NaN or inf "
                                             r"values \(model.proj_out.linear_1.weight\)"):
            train(recipe)
    finally:
        hook.remove()
    assert len(steps) == 2
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "final.incomplete").exists()


# -- a full disk --------------------------------------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_incomplete_checkpoint(harmon_folder, text_data,
                                                                                      tmp_path, monkeypatch, capsys):
    disk_full_in(monkeypatch, "checkpoint-2")
    path = recipe_file(tmp_path / "recipe.yaml", recipe_values(harmon_folder, text_data, tmp_path / "run",
                                                               save_steps=1))
    assert main(["train", str(path)]) == 1
    assert error_line(capsys) == (f"harmon train: error: cannot write {tmp_path / 'run' / 'checkpoint-2'}: "
                                  f"File too large (the incomplete folder was removed)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-1"]
    assert latest_complete_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-1"


def test_a_full_disk_at_the_final_save_keeps_the_earlier_final_model(harmon_folder, text_data, tmp_path, monkeypatch,
                                                                      capsys):
    earlier = tmp_path / "run" / "final"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_text("an earlier run's model")
    disk_full_in(monkeypatch, "final.incomplete")
    path = recipe_file(tmp_path / "recipe.yaml", recipe_values(harmon_folder, text_data, tmp_path / "run",
                                                               max_steps=2))
    assert main(["train", str(path)]) == 1
    assert error_line(capsys) == (f"harmon train: error: cannot write {earlier}: File too large (the incomplete "
                                  f"folder was removed)")
    assert [p.name for p in earlier.iterdir()] == ["model.safetensors"]
    assert (earlier / "model.safetensors").read_text() == "an earlier run's model"
    assert not (tmp_path / "run" / "final.incomplete").exists()


def test_a_torch_save_that_cannot_write_is_one_line(tmp_path):
    """torch.save's zip writer says only "unexpected pos" when a write fails."""
    target = tmp_path / "checkpoint-1"
    target.mkdir()
    with file_size_limit(1000), pytest.raises(ValueError) as refused:
        with writing(target, incomplete=target):
            torch.save({"state": torch.zeros(10_000)}, target / "optimizer.pt")
    assert str(refused.value) == f"cannot write {target}: the write failed (the incomplete folder was removed)"
    assert not target.exists()


def test_a_successful_final_save_replaces_an_earlier_final_model(harmon_folder, text_data, tmp_path):
    earlier = tmp_path / "run" / "final"
    earlier.mkdir(parents=True)
    (earlier / "stale.txt").write_text("from an earlier run")
    final = train(from_dict(Recipe, recipe_values(harmon_folder, text_data, tmp_path / "run", max_steps=1), "recipe"))
    assert final == earlier and not (final / "stale.txt").exists() and (final / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("final")) == ["final"]


# -- a tampered checkpoint ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(harmon_folder, text_data, tmp_path_factory):
    """A run folder with checkpoint-1 (of a 1-step run), to copy and tamper with."""
    output = tmp_path_factory.mktemp("checkpointed") / "run"
    train(from_dict(Recipe, recipe_values(harmon_folder, text_data, output, max_steps=1, save_steps=1), "recipe"))
    assert (output / "checkpoint-1" / CHECKPOINT_COMPLETE).exists()
    return output


class RunsCode:
    """A pickle that creates a folder when unpickled: what a tampered checkpoint could do on loading."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __reduce__(self):
        return os.makedirs, (self.folder,)


@pytest.mark.parametrize(
    "name, tamper, reason",
    [
        pytest.param("optimizer.pt", "code", r"refused, it is not a plain tensor file \(it asks for os.makedirs\)",
                     id="code-in-optimizer"),
        pytest.param("rng_state.pth", "code", r"refused, it is not a plain tensor file \(it asks for os.makedirs\)",
                     id="code-in-rng-state"),
        pytest.param("scheduler.pt", "truncate",
                     r"the file is corrupt \(PytorchStreamReader failed reading zip archive: .*\)", id="cut-scheduler"),
        pytest.param("model.safetensors", "truncate", r"the file is corrupt \(Error while deserializing header: .*\)",
                     id="cut-weights"),
        pytest.param("trainer_state.json", "truncate", r"the file is corrupt \(.*\)", id="cut-trainer-state"),
    ],
)
def test_a_tampered_checkpoint_is_refused_in_one_line(one_checkpoint, harmon_folder, text_data, tmp_path, capsys,
                                                      name, tamper, reason):
    run = tmp_path / "run"
    shutil.copytree(one_checkpoint / "checkpoint-1", run / "checkpoint-1")
    target = run / "checkpoint-1" / name
    if tamper == "code":
        torch.save({"state": RunsCode(tmp_path / "code-ran")}, target)
    else:
        target.write_bytes(target.read_bytes()[:40])
    path = recipe_file(tmp_path / "recipe.yaml", recipe_values(harmon_folder, text_data, run, max_steps=2))
    assert main(["train", str(path), "--resume"]) == 1
    message = error_line(capsys)
    assert re.fullmatch(f"harmon train: error: cannot resume from {re.escape(str(target))}: {reason}", message), message
    assert "weights_only" not in message and not (tmp_path / "code-ran").exists() and not (run / "final").exists()


# -- impossible settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_steps=0", "training.max_steps must be a positive whole number, as streamed data has no length "
                                 "to count the steps by; got 0"),
        ("training.max_steps=-1", "training.max_steps must be a positive whole number, as streamed data has no length "
                                  "to count the steps by; got -1"),
        ("training.max_steps=2.5", "training.max_steps must be a positive whole number, as streamed data has no "
                                   "length to count the steps by; got 2.5"),
        ("training.on_nonfinite=ignore", "training.on_nonfinite must be one of ('stop', 'skip'), got 'ignore'"),
    ],
)
def test_impossible_training_settings_are_refused_before_the_model_loads(harmon_folder, text_data, tmp_path,
                                                                         monkeypatch, capsys, override, message):
    from harmon_hf.training import run as run_module

    class ModelLoaded(Exception):
        pass

    def refuse(recipe):
        raise ModelLoaded

    monkeypatch.setattr(run_module, "load_model", refuse)
    path = recipe_file(tmp_path / "recipe.yaml", recipe_values(harmon_folder, text_data, tmp_path / "run"))
    assert main(["train", str(path), override]) == 1
    assert error_line(capsys) == f"harmon train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_recipe_without_max_steps_is_refused(harmon_folder, text_data, tmp_path):
    values = recipe_values(harmon_folder, text_data, tmp_path / "run")
    del values["training"]["max_steps"]
    with pytest.raises(ValueError, match="training.max_steps must be a positive whole number, as streamed data has no "
                                         "length to count the steps by; it is not set"):
        train(from_dict(Recipe, values, "recipe"))


def test_skip_mode_is_refused_under_deepspeed_which_steps_inside_the_backward_pass(harmon_folder, text_data,
                                                                                    tmp_path):
    path = recipe_file(tmp_path / "recipe.yaml", recipe_values(harmon_folder, text_data, tmp_path / "run",
                                                               on_nonfinite="skip"))
    config = Path(__file__).resolve().parent.parent / "training" / "accelerate" / "zero2.yaml"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                             "--num_processes", "1", "-m", "harmon_hf.cli", "train", str(path)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert ("harmon train: error: training.on_nonfinite: skip does not work under DeepSpeed, which takes the optimizer "
            "step inside the backward pass; use stop\n") in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()
