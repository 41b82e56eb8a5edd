"""Harmon-Shapes, the model bundled with harmon-hf: what a fresh install draws and answers, with no download."""

import json
from pathlib import Path

from PIL import Image

from conftest import load_script, run_harmon
from harmon_hf import BUNDLED_MODEL, HarmonPipeline, bundled_model_path
from harmon_hf.shapes.detector import Requirement, detect, satisfies
from harmon_hf.shapes.world import Scene, ShapeObject, cell_centre, render

release = load_script("benchmarks/shapes/release.py")

# ShapesEval's first SAMPLES held-out cases of each half, default sampler: the bundled model scored 1.000 on
# generation and 0.960 on understanding (`harmon eval shapes --n 50`; 0.995 and 0.950 on 200 in its card). The floors
# leave room for a few images and answers that floating point on another processor may tip.
SAMPLES = 50
FLOORS = {"generation": 0.92, "understanding": 0.90}


def harmon(*args):
    """The command as a user runs it, with no model named anywhere."""
    return run_harmon(*args, env={"HARMON_MODEL": ""}, timeout=600)


def test_the_bundled_model_is_installed_small_and_carries_its_scores():
    assert bundled_model_path() == BUNDLED_MODEL
    assert sum(path.stat().st_size for path in BUNDLED_MODEL.rglob("*") if path.is_file()) <= release.MAX_BUNDLED_BYTES
    evaluation = json.loads((BUNDLED_MODEL / "shapes_eval.json").read_text())
    final, card = evaluation["final"], (BUNDLED_MODEL / "README.md").read_text()
    assert final["samples"] >= release.MIN_SAMPLES
    for half in ("generation", "understanding"):
        assert final[half]["overall"] >= release.TARGET_SCORE
        assert f"{final[half]['overall']:.3f}" in card


def test_the_bundled_remote_code_is_the_packages_model_code():
    """The folder carries the model code for `AutoModel.from_pretrained(..., trust_remote_code=True)`, as a Hub
    repository does; it must be the package's own, or the two would drift apart."""
    import harmon_hf.modeling

    remote_code = sorted(path.name for path in BUNDLED_MODEL.glob("*.py"))
    assert remote_code  # the folder loads through the Auto classes without harmon_hf's registration
    for name in remote_code:
        assert (BUNDLED_MODEL / name).read_text() == (Path(harmon_hf.modeling.__file__).parent / name).read_text(), (
            f"{name} of the bundled model differs from harmon_hf.modeling's: copy it over")


def test_shapes_eval_of_the_bundled_model_stays_above_its_floors(tmp_path):
    result = harmon("eval", "shapes", "--n", SAMPLES, "--json", tmp_path / "scores.json")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    for half, floor in FLOORS.items():
        assert scores[half]["overall"] >= floor, (half, scores[half])


def test_generate_and_describe_default_to_the_bundled_model(tmp_path):
    result = harmon("generate", "a red circle left of a blue square", "-o", tmp_path / "out.png", "--seed", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    asked = Requirement((("red", "circle", 1), ("blue", "square", 1)), relation="left of")
    assert satisfies(detect(Image.open(tmp_path / "out.png")), asked)

    circle = Scene("single", (ShapeObject("circle", "green", *cell_centre(1, 1), "big"),), region="centre")
    render(circle).save(tmp_path / "circle.png")
    result = harmon("describe", tmp_path / "circle.png", "What colour is the circle?")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "green"


def test_the_command_and_the_space_default_to_the_bundled_model(monkeypatch):
    from harmon_hf.loading import load_pipeline

    monkeypatch.delenv("HARMON_MODEL", raising=False)
    assert load_pipeline(None).model.name_or_path == str(BUNDLED_MODEL)  # what the Space serves without a model
