"""Harmon-Shapes' training chain: `harmon shapes init`, then the bundled shapes recipes through `harmon train`."""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import REPO, load_script, run_harmon
from harmon_hf.shapes.world import CELLS, IMAGE_SIZE, cell_index
from harmon_hf.training import Recipe

diagnose = load_script("benchmarks/shapes/diagnose.py")
release = load_script("benchmarks/shapes/release.py")

STAGES = ("stage0_language", "stage1", "stage2", "stage3")


def harmon(*args):
    result = run_harmon(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def world_folder(harmon_folder, tmp_path_factory):
    """The golden tiny model at the shapes world's image size, so that its tokens are the world's cells."""
    folder = tmp_path_factory.mktemp("world-model") / "model"
    shutil.copytree(harmon_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_size": IMAGE_SIZE}))
    return folder


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
    # captions, conversations in words, and the image's questions about the scene in cell tokens
    assert [source.conversations_column for source in recipes["stage0_language"].data] == [None, "language", "cells"]
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


def test_release_copies_the_model_with_a_card_of_its_scores(harmon_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(harmon_folder, run / "stage3" / "final")
    (run / "training-seconds").write_text("2642")
    (run / "cpu").write_text("AMD EPYC, AVX2 with 2 threads\n")
    for index, (file, _) in enumerate(release.EVALUATIONS.values()):
        scores = {"generation": {c: 0.5 for c in ("object", "colour", "count", "two objects", "position")},
                  "understanding": {t: 0.25 for t in ("colour", "shape", "count", "position", "yes/no")},
                  "seconds_per_image": 0.5, "samples": 200}
        scores["generation"]["overall"] = 0.1 * (index + 1)
        scores["understanding"]["overall"] = 0.2 * (index + 1)
        (run / file).write_text(json.dumps(scores))
    # The final scores (0.3 and 0.6) are below the targets: refused, nothing written, unless forced.
    with pytest.raises(ValueError, match=r"generation 0.300 < 0.9; understanding 0.600 < 0.9"):
        release.release(run, tmp_path / "bundled")
    assert not (tmp_path / "bundled").exists()
    refused = subprocess.run([sys.executable, REPO / "benchmarks" / "shapes" / "release.py", str(run)],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "below the targets" in refused.stderr and "--force" in refused.stderr
    destination = release.release(run, tmp_path / "bundled", force=True)
    card = (destination / "README.md").read_text()
    assert "44.0 minutes of training on a 2-core CPU,\nAMD EPYC, AVX2 with 2 threads" in card
    assert "**0.400**" in card and "**0.800**" in card  # stage III with DPM-Solver
    assert "after stage I" in card and "after stage II" in card
    assert json.loads((destination / release.EVALUATION_FILE).read_text())["final"]["generation"]["overall"] == pytest.approx(0.3)
    assert (destination / "model.safetensors").is_file()
    monkeypatch.setattr(release, "MAX_BUNDLED_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 0 MB limit"):
        release.release(run, tmp_path / "too-big", force=True)
    assert not (tmp_path / "too-big").exists()


def test_prompt_influence_finds_where_the_prompt_is_lost(world_folder, capsys):
    from harmon_hf import HarmonProcessor
    from harmon_hf.modeling import HarmonForConditionalGeneration

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    processor = HarmonProcessor.from_pretrained(world_folder)
    influence = diagnose.prompt_influence(model, processor, count=4)
    assert list(influence) == list(diagnose.PROMPT_PATH) and all(value > 1e-3 for value in influence.values())
    # A proj_out that drops the LLM's output (only its bias is left): the prompt is lost at `projected`.
    with torch.no_grad():
        model.model.proj_out.linear_2.weight.zero_()
    deaf = diagnose.prompt_influence(model, processor, count=4)
    assert deaf["llm_output"] == pytest.approx(influence["llm_output"])
    assert deaf["projected"] == deaf["decoder_input"] == deaf["conditions"] == 0.0
    with pytest.raises(ValueError, match="count must be at least 2"):
        diagnose.prompt_influence(model, processor, count=1)
    diagnose.main([str(world_folder), "--count", "4", "--recall-count", "3", "--answer-count", "5"])
    printed = capsys.readouterr().out
    assert all(f"{step} " in printed for step in diagnose.PROMPT_PATH) and f"{influence['conditions']:.4f}" in printed
    assert all(f"  {measure} " in printed for measure in diagnose.RECALL_MEASURES)
    assert all(f"  {measure} " in printed for measure in diagnose.FIRST_ROUND_MEASURES)
    assert "latent distance between colours" in printed
    assert "right answers by question type and kind of scene, about the image (5 training" in printed
    assert "about its description, no image" in printed


def test_object_recall_reads_what_the_head_draws_in_the_masked_cell(world_folder, monkeypatch):
    from harmon_hf import HarmonProcessor
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.vae import render_pixels
    from harmon_hf.shapes.world import Scene

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    processor = HarmonProcessor.from_pretrained(world_folder)
    recall = diagnose.object_recall(model, processor, count=6)
    assert list(recall) == list(diagnose.RECALL_MEASURES) and all(0.0 <= value <= 1.0 for value in recall.values())

    # A head that draws the true token scores 1.0; one that draws the empty cell scores `empty` 1.0 and nothing else.
    seen, run_round = {}, model.model.run_round

    def spying_run_round(tokens, mask, *args, **kwargs):
        seen.update(truth=tokens[mask.bool()], cells=mask.argmax(dim=1))
        return run_round(tokens, mask, *args, **kwargs)

    monkeypatch.setattr(model.model, "run_round", spying_run_round)
    monkeypatch.setattr(model.model.diffusion_head, "sample", lambda conditions, *args, **kwargs: seen["truth"])
    assert diagnose.object_recall(model, processor, count=6) == {"object": 1.0, "colour": 1.0, "shape": 1.0,
                                                                 "empty": 0.0}
    with torch.no_grad():
        empty_scene = model.encode_images(render_pixels([Scene("single", ())], IMAGE_SIZE)).flatten(1, 2)[0]
    monkeypatch.setattr(model.model.diffusion_head, "sample", lambda conditions, *args, **kwargs: empty_scene[seen["cells"]])
    assert diagnose.object_recall(model, processor, count=6) == {"object": 0.0, "colour": 0.0, "shape": 0.0,
                                                                 "empty": 1.0}
    with pytest.raises(ValueError, match="count must be at least 1"):
        diagnose.object_recall(model, processor, count=0)


def test_first_round_reads_every_cell_the_head_draws_with_all_tokens_masked(world_folder, monkeypatch):
    from harmon_hf import HarmonProcessor
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.vae import render_pixels
    from harmon_hf.shapes.world import PALETTE, Scene

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    processor = HarmonProcessor.from_pretrained(world_folder)
    scenes = diagnose.first_round_scenes(6)
    draws = diagnose.first_round_draws(model, processor, scenes)
    assert len(draws) == 6 and all(len(cells) == CELLS * CELLS for cells in draws)
    assert list(diagnose.first_round_binding(scenes, draws)) == list(diagnose.FIRST_ROUND_MEASURES)

    # A head that draws each scene's object token in its cell and the empty token elsewhere draws exactly its one
    # object in every image, in the asked colour.
    with torch.no_grad():
        own = model.encode_images(render_pixels(scenes, IMAGE_SIZE)).flatten(1, 2)  # (6, cells, c)
        empty = model.encode_images(render_pixels([Scene("single", ())] * 6, IMAGE_SIZE)).flatten(1, 2)
    cells = torch.tensor([cell_index(scene.objects[0]) for scene in scenes])
    truth = empty.clone()
    truth[torch.arange(6), cells] = own[torch.arange(6), cells]
    truth, empty = truth.flatten(0, 1), empty.flatten(0, 1)  # (6 * cells, c), scene-major as the head samples them
    monkeypatch.setattr(model.model.diffusion_head, "sample", lambda conditions, *args, **kwargs: truth)
    draws = diagnose.first_round_draws(model, processor, scenes)
    assert [sum(content is not None for content in cells) for cells in draws] == [1] * 6
    assert diagnose.first_round_binding(scenes, draws) == {"objects per image": 1.0, "object": 1.0, "colour": 1.0,
                                                           "shape": 1.0}
    confusion = diagnose.colour_confusion(scenes, draws)
    for asked in PALETTE:
        assert confusion[asked][asked] == sum(scene.objects[0].colour == asked for scene in scenes)
        assert sum(confusion[asked].values()) == confusion[asked][asked]
    # One that draws nothing: no objects, and no share of them to report.
    monkeypatch.setattr(model.model.diffusion_head, "sample", lambda conditions, *args, **kwargs: empty)
    nothing = diagnose.first_round_binding(scenes, diagnose.first_round_draws(model, processor, scenes))
    assert nothing["objects per image"] == 0.0
    assert all(math.isnan(nothing[measure]) for measure in ("object", "colour", "shape"))
    with pytest.raises(ValueError, match="count must be at least 1"):
        diagnose.first_round_scenes(0)


def test_colour_separation_measures_distances_between_latent_tokens(world_folder, monkeypatch):
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.world import PALETTE

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    separation = diagnose.colour_separation(model)
    table = separation["colours"]
    assert list(table) == list(PALETTE) and all(list(row) == list(PALETTE) for row in table.values())
    for a in PALETTE:
        assert table[a][a] == pytest.approx(0.0, abs=1e-4)
        for b in PALETTE:
            assert table[a][b] == pytest.approx(table[b][a], rel=1e-5)
            assert a == b or table[a][b] > 0
    assert separation["object to empty"] > 0

    # Distances in the latent space: tokens twice as large are twice as far apart.
    encode_images = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: 2 * encode_images(pixels))
    doubled = diagnose.colour_separation(model)
    assert doubled["object to empty"] == pytest.approx(2 * separation["object to empty"], rel=1e-4)
    assert doubled["colours"]["red"]["blue"] == pytest.approx(2 * table["red"]["blue"], rel=1e-4)


def test_answers_by_scene_kind_asks_about_the_image_or_its_description(world_folder, monkeypatch):
    from harmon_hf import HarmonProcessor
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.world import KINDS, QUESTION_TYPES

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    processor = HarmonProcessor.from_pretrained(world_folder)
    table = diagnose.answers_by_scene_kind(model, processor, count=10)
    assert list(table) == list(QUESTION_TYPES)
    assert all(set(by_kind) <= set(KINDS) and all(0 <= v <= 1 for v in by_kind.values()) for by_kind in table.values())

    asked = []

    def always_yes(model, processor, questions, images=None):
        asked.append((questions, images))
        return ["yes"] * len(questions)

    monkeypatch.setattr(diagnose, "answer_questions", always_yes)
    for about in ("image", "words", "cells"):
        table = diagnose.answers_by_scene_kind(model, processor, count=60, about=about)
        assert all(value == 0.0 for question_type, by_kind in table.items() if question_type != "yes/no"
                   for value in by_kind.values())
        assert 0 < sum(table["yes/no"].values()) / len(table["yes/no"]) < 1
    (questions, images), (described, no_images), (in_cells, no_cell_images) = asked[0], asked[2], asked[-1]
    assert len(images) == len(questions) and images[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert no_images is None and all(text.index(". ") < text.index("?") for text in described)
    assert no_cell_images is None and all(text.count("<") == CELLS * CELLS for text in in_cells)


def test_object_token_probe_reads_attributes_from_each_objects_token(world_folder, monkeypatch):
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.world import PALETTE, SHAPES, Scene

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    probe = diagnose.object_token_probe(model, count=40)
    assert list(probe) == ["colour", "shape"] and all(0 <= value <= 1 for value in probe.values())

    def features(scenes: list[Scene], attributes: bool):
        """Tokens that hold each object's colour and shape one-hot in its cell (or, without `attributes`, only
        that something is there)."""
        tokens = torch.zeros(len(scenes), CELLS * CELLS, len(PALETTE) + len(SHAPES) + 1)
        for row, scene in enumerate(scenes):
            for obj in scene.objects:
                tokens[row, cell_index(obj), -1] = 1.0
                if attributes:
                    tokens[row, cell_index(obj), list(PALETTE).index(obj.colour)] = 1.0
                    tokens[row, cell_index(obj), len(PALETTE) + SHAPES.index(obj.shape)] = 1.0
        return tokens

    monkeypatch.setattr(diagnose, "render_pixels", lambda scenes, size: scenes)  # the "pixels" are the scenes
    monkeypatch.setattr(model.model, "get_image_features", lambda scenes: BaseModelOutputWithPooling(pooler_output=features(scenes, attributes=True)))
    assert diagnose.object_token_probe(model, count=40) == {"colour": 1.0, "shape": 1.0}
    monkeypatch.setattr(model.model, "get_image_features", lambda scenes: BaseModelOutputWithPooling(pooler_output=features(scenes, attributes=False)))
    blind = diagnose.object_token_probe(model, count=40)
    assert blind["colour"] < 0.5 and blind["shape"] < 0.7


def test_object_token_mixing_measures_how_much_of_a_token_is_the_other_object(world_folder, monkeypatch):
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.world import PALETTE, SHAPES, Scene

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()

    def attributes(obj) -> torch.Tensor:
        vector = torch.zeros(len(PALETTE) + len(SHAPES) + 1)
        vector[list(PALETTE).index(obj.colour)] = vector[len(PALETTE) + SHAPES.index(obj.shape)] = 1.0
        vector[-1] = 1.0
        return vector

    def features(scenes: list[Scene], mixing: float):
        """Each object's token: its own colour and shape one-hot, plus `mixing` times the other object's."""
        tokens = torch.zeros(len(scenes), CELLS * CELLS, len(PALETTE) + len(SHAPES) + 1)
        for row, scene in enumerate(scenes):
            first, second = scene.objects
            tokens[row, cell_index(first)] = attributes(first) + mixing * attributes(second)
            tokens[row, cell_index(second)] = attributes(second) + mixing * attributes(first)
        return tokens

    monkeypatch.setattr(diagnose, "render_pixels", lambda scenes, size: scenes)  # the "pixels" are the scenes
    for mixing in (0.0, 0.5, 1.0):
        monkeypatch.setattr(model.model, "get_image_features", lambda scenes: BaseModelOutputWithPooling(pooler_output=features(scenes, mixing)))
        assert diagnose.object_token_mixing(model, count=200) == pytest.approx(mixing, abs=1e-4)


def test_named_object_questions_name_the_object_in_the_named_cell():
    from harmon_hf.shapes.world import questions

    asked = diagnose.named_object_questions(100)
    kinds = Counter()
    for scene, question, named_cell, other_cell in asked:
        by_cell = {cell_index(obj): obj for obj in scene.objects}
        named, other = by_cell[named_cell], by_cell[other_cell]
        assert named is not other
        question_type, answer = {text: (kind, answer) for kind, text, answer in questions(scene)}[question]
        assert answer == (named.colour if question_type == "colour" else named.shape)
        kinds[question_type] += 1
    assert set(kinds) == {"colour", "shape"} and min(kinds.values()) > 25


def test_attention_to_named_object_reads_the_answer_positions_attention(world_folder, monkeypatch):
    from types import SimpleNamespace

    from harmon_hf import HarmonProcessor
    from harmon_hf.modeling import HarmonForConditionalGeneration

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    processor = HarmonProcessor.from_pretrained(world_folder)
    language_model = model.model.language_model
    implementation = language_model.config._attn_implementation
    layers = diagnose.attention_to_named_object(model, processor, count=6)
    assert len(layers) == model.config.text_config.num_hidden_layers
    assert all(0 <= layer["named"] and 0 <= layer["other"] and layer["named"] + layer["other"] <= 1 for layer in layers)
    assert language_model.config._attn_implementation == implementation != "eager"  # put back for generating

    # Every question names the object in cell 3, the other is in cell 5; questions of two lengths, so the prompts
    # are padded. The fake LLM looks at the other object from every position but the answer's, where head 0 looks
    # at the named object and head 1 at the first token.
    questions = diagnose.named_object_questions(10)
    questions = [(scene, question, 3, 5) for scene, question, _, _ in questions]
    assert len({len(question) for _, question, _, _ in questions}) > 1
    monkeypatch.setattr(diagnose, "named_object_questions", lambda count, seed=0: questions[:count])

    def looking_llm(input_ids, attention_mask, output_attentions, **inputs):
        attention = torch.zeros(len(input_ids), 2, input_ids.shape[1], input_ids.shape[1])
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            placeholders = (ids == model.config.image_token_id).nonzero().flatten()
            attention[row, :, :, placeholders[5]] = 1.0
            answer = int(mask.nonzero().max())
            attention[row, :, answer] = 0.0
            attention[row, 0, answer, placeholders[3]] = 1.0
            attention[row, 1, answer, 0] = 1.0
        return SimpleNamespace(attentions=(attention, attention))

    monkeypatch.setattr(model, "forward", looking_llm)
    assert diagnose.attention_to_named_object(model, processor, count=10) == [
        {"named": 0.5, "other": 0.0, "best head": 1.0}] * 2


def test_named_attribute_probe_reads_what_the_question_names_at_the_answers_position(world_folder, monkeypatch):
    from types import SimpleNamespace

    from harmon_hf import HarmonProcessor
    from harmon_hf.modeling import HarmonForConditionalGeneration
    from harmon_hf.shapes.world import PALETTE, SHAPES

    model = HarmonForConditionalGeneration.from_pretrained(world_folder).eval()
    processor = HarmonProcessor.from_pretrained(world_folder)
    layers = diagnose.named_attribute_probe(model, processor, count=20)
    assert len(layers) == model.config.text_config.num_hidden_layers
    assert all(set(layer) == {"colour", "shape"} and all(0 <= v <= 1 for v in layer.values()) for layer in layers)

    # A fake LLM whose first layer's input is noise and whose second layer's input holds, at the answer's position
    # only, the word the question names (one-hot over the colours and shapes); noise everywhere else.
    words = [*PALETTE, *SHAPES]

    def naming_llm(input_ids, attention_mask, output_hidden_states, **inputs):
        generator = torch.Generator().manual_seed(int(input_ids.sum()))
        noise = lambda: torch.randn(*input_ids.shape, len(words), generator=generator)
        informative = noise()
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            question = processor.tokenizer.decode(ids[mask.bool()]).split("?")[0]
            named = [word for word in words if f" {word}" in question]
            assert len(named) == 1, question
            informative[row, int(mask.nonzero().max())] = torch.nn.functional.one_hot(
                torch.tensor(words.index(named[0])), len(words)).float()
        return SimpleNamespace(hidden_states=(noise(), informative, noise()))

    monkeypatch.setattr(model, "forward", naming_llm)
    blind, knowing = diagnose.named_attribute_probe(model, processor, count=40)
    assert knowing == {"colour": 1.0, "shape": 1.0}
    assert blind["colour"] < 0.5 and blind["shape"] < 0.7
