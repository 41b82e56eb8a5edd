"""The shapes world, its held-out split, and the detector that judges ShapesEval."""

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from harmon_hf.shapes.cases import GENERATION_CATEGORIES, generation_cases, understanding_cases
from harmon_hf.shapes.detector import Requirement, classify_shape, detect, satisfies
from harmon_hf.shapes.vae import round_trip_score
from harmon_hf.shapes.world import (CELLS_QUESTIONS, DEFAULT_REGION, HELD_OUT, IMAGE_SIZE, KINDS, PALETTE,
                                    QUESTION_TYPES, REGION_PHRASES, REGIONS, SHAPES, SIZES, Scene, ShapeObject,
                                    all_combinations, caption, cell_centre, cells_conversation, describe, is_held_out,
                                    language_conversation, questions, render, sample_split_scene, shapes_dataset)
from harmon_hf.modeling.processing_harmon import GENERATION_INSTRUCTION


def test_detector_scores_at_least_099_on_ground_truth_renders():
    cases = generation_cases(400, seed=1)
    correct = Counter(case.category for case in cases if case.is_met_by(render(case.scene)))
    totals = Counter(case.category for case in cases)
    for category in GENERATION_CATEGORIES:
        assert correct[category] / totals[category] >= 0.99, (category, correct[category], totals[category])


def test_detector_finds_every_object_of_random_training_scenes():
    rng = random.Random(2)
    for _ in range(200):
        scene = sample_split_scene(rng, "train")
        found = sorted((d.colour, d.shape) for d in detect(render(scene)))
        assert found == sorted((o.colour, o.shape) for o in scene.objects), scene


def test_detector_rejects_what_the_prompt_does_not_show():
    scene = Scene("relation", (ShapeObject("circle", "red", 0.25, 0.5, "big"),
                               ShapeObject("square", "blue", 0.75, 0.5, "big")), relation="left of")
    detections = detect(render(scene))
    both = ((("red", "circle", 1), ("blue", "square", 1)))
    assert satisfies(detections, Requirement(both, relation="left of"))
    assert not satisfies(detections, Requirement(both, relation="right of"))
    assert not satisfies(detections, Requirement(both, relation="above"))
    assert not satisfies(detections, Requirement((("red", "circle", 1),)))  # an extra object
    assert not satisfies(detections, Requirement((("green", "circle", 1), ("blue", "square", 1))))
    assert not satisfies(detections, Requirement((("red", "triangle", 1), ("blue", "square", 1))))
    assert not satisfies(detect(Image.new("RGB", (64, 64), "white")), Requirement((("red", "circle", 1),)))


def test_shapes_are_told_apart_by_their_outline_at_every_size():
    for size in (12, 20, 40):
        square = np.ones((size, size), bool)
        rows, columns = np.mgrid[:size, :size] + 0.5
        circle = (rows - size / 2) ** 2 + (columns - size / 2) ** 2 <= (size / 2) ** 2
        triangle = np.abs(columns - size / 2) <= rows / 2
        assert [classify_shape(m) for m in (square, circle, triangle)] == ["square", "circle", "triangle"]
    assert classify_shape(np.ones((10, 30), bool)) == "unknown"  # two touching squares are not one shape


def test_held_out_combinations_never_appear_in_training_and_are_all_reachable():
    rng = random.Random(3)
    train = [sample_split_scene(rng, "train") for _ in range(3000)]
    assert not any(is_held_out(scene.combination) for scene in train)
    held_out = {sample_split_scene(rng, "heldout").combination for _ in range(3000)}
    assert held_out == HELD_OUT
    for kind, combinations in all_combinations().items():  # every kind keeps some combinations back
        assert 0 < sum(c in HELD_OUT for c in combinations) < len(combinations), kind


def test_world_covers_the_attributes_and_kinds():
    rng = random.Random(4)
    scenes = [sample_split_scene(rng, "train") for _ in range(2000)]
    assert {scene.kind for scene in scenes} == set(KINDS)
    assert {o.colour for s in scenes for o in s.objects} == set(PALETTE) and len(PALETTE) >= 6
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES) >= {"circle", "square", "triangle"}
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.relation for s in scenes if s.relation} == {"left of", "right of", "above", "below"}
    assert len({caption(scene, rng) for scene in scenes[:300]}) > 250  # varied phrasings


def test_a_caption_settles_the_layout():
    """Captions that say the same, up to sizes, describe objects of the same shapes in the same cells; a single
    object whose place is unsaid is at the default place."""
    rng = random.Random(6)
    layouts = {}
    for _ in range(3000):
        scene = sample_split_scene(rng, "train")
        text = caption(scene, rng)
        key = " ".join(word for word in text.split() if word not in SIZES)
        layout = tuple((obj.shape, obj.x, obj.y) for obj in scene.objects)
        assert layouts.setdefault(key, layout) == layout, (text, layouts[key], layout)
        if scene.kind == "single" and not any(phrase in text for phrases in REGION_PHRASES.values()
                                              for phrase in phrases):
            assert (scene.objects[0].x, scene.objects[0].y) == cell_centre(*REGIONS[DEFAULT_REGION]), text
    assert len(layouts) > 500


def test_questions_have_one_word_answers_that_are_true():
    scene = Scene("count", (ShapeObject("triangle", "green", 0.3, 0.3, "small"),
                            ShapeObject("triangle", "green", 0.7, 0.7, "small")))
    asked = {question: answer for _, question, answer in questions(scene)}
    assert asked["How many triangles are there?"] == "two"
    assert asked["How many circles are there?"] == "zero"
    assert asked["Is there a green triangle?"] == "yes" and asked["Is there a red triangle?"] == "no"
    assert "What colour is the triangle?" not in asked  # two triangles: ambiguous, never asked
    cases = understanding_cases(50)
    assert Counter(case.question_type for case in cases) == {t: 10 for t in QUESTION_TYPES}
    assert all(is_held_out(case.scene.combination) and " " not in case.answer for case in cases)


def test_dataset_streams_reproducibly_with_conversations():
    first = list(shapes_dataset("train", seed=5, limit=4))
    again = list(shapes_dataset("train", seed=5, limit=4))
    assert [row["text"] for row in first] == [row["text"] for row in again]
    assert np.array_equal(np.asarray(first[0]["image"]), np.asarray(again[0]["image"]))
    assert first[0]["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
    turns = first[0]["conversations"]
    assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n") and turns[1]["from"] == "gpt"
    assert [row["language"] for row in first] == [row["language"] for row in again]
    assert all("<image>" not in turn["value"] for row in first for turn in row["language"] + row["cells"])
    with pytest.raises(ValueError, match="split must be"):
        shapes_dataset("validation")


def test_language_conversations_restate_requests_or_answer_from_a_description():
    scene = Scene("relation", (ShapeObject("circle", "red", 0.125, 0.375, "big"),
                               ShapeObject("square", "blue", 0.625, 0.375, "small")), relation="left of")
    truth = {question: answer for _, question, answer in questions(scene)}
    description = describe(scene).capitalize() + ". "
    kinds = Counter()
    for seed in range(40):
        turns = language_conversation(scene, random.Random(seed))
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        if len(turns) == 2:  # a generation request, answered by what it asks for
            assert turns[0]["value"] == GENERATION_INSTRUCTION.format(prompt=turns[1]["value"])
            assert "circle" in turns[1]["value"] and "square" in turns[1]["value"]
            kinds["request"] += 1
        else:  # questions after a description that settles them
            assert turns[0]["value"].startswith(description)
            asked = [turns[0]["value"][len(description):]] + [turn["value"] for turn in turns[2::2]]
            assert [truth[question] for question in asked] == [turn["value"] for turn in turns[1::2]]
            kinds["questions"] += 1
    assert kinds["request"] >= 10 and kinds["questions"] >= 10


def test_cells_conversations_ask_the_images_questions_about_one_token_per_cell():
    from harmon_hf.shapes.build import make_tokenizer

    scene = Scene("relation", (ShapeObject("circle", "red", *cell_centre(0, 1), "big"),
                               ShapeObject("square", "blue", *cell_centre(2, 1), "small")), relation="left of")
    cells = "<empty>" * 3 + "<red_circle><empty><blue_square>" + "<empty>" * 3  # rows top to bottom
    truth = {question: (question_type, answer) for question_type, question, answer in questions(scene)}
    asked_types = Counter()
    for seed in range(10):
        turns = cells_conversation(scene, random.Random(seed))
        assert turns[0]["value"].startswith(cells + "\n") and len(turns) == 2 * CELLS_QUESTIONS
        asked = [turns[0]["value"][len(cells) + 1:]] + [turn["value"] for turn in turns[2::2]]
        assert [truth[question][1] for question in asked] == [turn["value"] for turn in turns[1::2]]
        asked_types.update(truth[question][0] for question in asked)
    # About two objects, only what needs the named one found: "What colour is the circle?", "Where is the red
    # circle relative to the blue square?"
    assert set(asked_types) == {"colour", "shape", "position"}
    single = Scene("single", (ShapeObject("circle", "red", *cell_centre(1, 1), "big"),), region="centre")
    asked_types = Counter(question.split()[0] for seed in range(10)
                          for question in (turn["value"] for turn in cells_conversation(single, random.Random(seed))[::2]))
    assert {"How", "Is"} <= set(asked_types)  # about one object, the image conversations' questions
    tokenizer = make_tokenizer()
    ids = tokenizer(cells, add_special_tokens=False)["input_ids"]
    assert len(ids) == 9 and tokenizer.convert_ids_to_tokens(ids[3:6]) == ["<red_circle>", "<empty>", "<blue_square>"]


class _IdentityAutoencoder:
    """Latents are the pixels; `blank` decodes everything to the white background."""

    def __init__(self, blank: bool = False):
        self.blank = blank

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=torch.ones_like(latents) if self.blank else latents)


def test_autoencoder_round_trip_is_judged_by_the_detector():
    assert round_trip_score(_IdentityAutoencoder(), num_scenes=40) == 1.0
    assert round_trip_score(_IdentityAutoencoder(blank=True), num_scenes=40) == 0.0


def test_autoencoder_decoder_trains_on_latents_with_the_fixed_posterior_deviation(monkeypatch):
    from diffusers import AutoencoderKL

    from harmon_hf.shapes import vae as shapes_vae

    seen = {}
    encode, decode = AutoencoderKL.encode, AutoencoderKL.decode

    def spying_encode(self, pixels, *args, **kwargs):
        output = encode(self, pixels, *args, **kwargs)
        seen["means"] = output.latent_dist.mean.detach()
        return output

    def spying_decode(self, latents, *args, **kwargs):
        seen.setdefault("noise", []).append((latents.detach() - seen["means"]).flatten())
        return decode(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spying_encode)
    monkeypatch.setattr(AutoencoderKL, "decode", spying_decode)
    shapes_vae.train_vae(steps=3, log_every=3)
    noise = torch.cat(seen["noise"])  # what each training step added to the encoder's means
    assert noise.std().item() == pytest.approx(shapes_vae.POSTERIOR_STD, rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * shapes_vae.POSTERIOR_STD
