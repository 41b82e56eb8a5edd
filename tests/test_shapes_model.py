"""Harmon-Shapes, the bundled default model: its files, ShapesEval on a small sample, and the defaults using it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harmon_hf import HarmonPipeline, bundled_model_path
from harmon_hf.shapes.detector import Requirement, detect, satisfies
from harmon_hf.shapes.release import EVALUATION_FILE, MAX_BUNDLED_BYTES
from harmon_hf.shapes.world import Scene, ShapeObject, render

BUNDLED = bundled_model_path()
SAMPLES = 40  # per half; the shipped numbers use 200
# How far below the shipped scores (200 samples) a 40-sample run may land: about two standard errors at 0.9.
FLOOR_MARGIN = 0.1


def harmon(*args):
    return subprocess.run([sys.executable, "-m", "harmon_hf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads((BUNDLED / EVALUATION_FILE).read_text())


def test_bundled_model_is_small_safetensors_with_card(shipped):
    assert BUNDLED is not None, "the package ships harmon_hf/models/harmon-shapes"
    files = {path.name: path.stat().st_size for path in BUNDLED.iterdir()}
    assert sum(files.values()) <= MAX_BUNDLED_BYTES
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert {"tokenizer.json", "processor_config.json", "config.json", "README.md"} <= set(files)
    card = (BUNDLED / "README.md").read_text()
    final = shipped["final"]
    assert final["samples"] >= 200
    assert final["generation"]["overall"] >= 0.9 and final["understanding"]["overall"] >= 0.9
    for name in ("stage1", "stage2", "final", "final_dpm_solver"):  # every evaluation is in the card's table
        assert f"**{shipped[name]['generation']['overall']:.3f}**" in card
        assert f"**{shipped[name]['understanding']['overall']:.3f}**" in card


def test_shapes_eval_small_sample_meets_the_shipped_scores(shipped, tmp_path):
    result = harmon("eval", "shapes", "--n", SAMPLES, "--json", tmp_path / "scores.json")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["generation"]) == {"object", "colour", "count", "two objects", "position", "overall"}
    assert set(scores["understanding"]) == {"colour", "shape", "count", "position", "yes/no", "overall"}
    assert "ShapesEval" in result.stdout and f"{scores['generation']['overall']:.3f}" in result.stdout
    assert "ShapesEval" in result.stderr  # the progress bar
    for half in ("generation", "understanding"):
        floor = shipped["final"][half]["overall"] - FLOOR_MARGIN
        assert scores[half]["overall"] >= floor, (half, scores[half], floor)


def test_the_issue_commands_work_with_no_model_argument(tmp_path):
    result = harmon("generate", "a red circle left of a blue square", "-o", tmp_path / "drawn.png")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "drawn.png") as image:
        assert image.size == (64, 64)
        requirement = Requirement((("red", "circle", 1), ("blue", "square", 1)), relation="left of")
        assert satisfies(detect(image), requirement)
    scene = Scene("pair", (ShapeObject("circle", "purple", 0.3, 0.3, "big"),
                           ShapeObject("triangle", "yellow", 0.7, 0.7, "big")))
    render(scene).save(tmp_path / "scene.png")
    answer = harmon("describe", tmp_path / "scene.png", "What colour is the circle?")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip().lower().rstrip(".") == "purple"


def test_pipeline_defaults_to_the_bundled_model():
    pipeline = HarmonPipeline.from_pretrained()
    assert pipeline.model.config.image_size == 64
    first = pipeline("a green triangle", generator=torch.Generator().manual_seed(1), num_iter=8).images[0]
    again = pipeline("a green triangle", generator=torch.Generator().manual_seed(1), num_iter=8).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert [(d.colour, d.shape) for d in detect(first)] == [("green", "triangle")]
