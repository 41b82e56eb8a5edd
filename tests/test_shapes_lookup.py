"""The lookup experiment: conversations about one of two objects, in words or one token per object."""

import random

import pytest
import torch
from transformers import Qwen2Config

from conftest import load_script
from harmon_hf import processor_for
from harmon_hf.shapes.build import make_tokenizer, shapes_config
from harmon_hf.shapes.world import OBJECT_TOKENS, colour_question, shape_question

lookup = load_script("benchmarks/shapes/lookup.py")


@pytest.fixture(scope="module")
def processor():
    tokenizer = make_tokenizer()
    return processor_for(shapes_config(tokenizer, vae_scale=1.0), tokenizer)


@pytest.mark.parametrize("objects", ["words", "tokens", "cells"])
def test_lookup_batches_ask_about_one_of_two_objects_and_label_only_the_answers(processor, objects):
    batch = lookup.lookup_batch(processor, random.Random(7), 16, objects)
    rng = random.Random(7)  # the same draws again, to know each row's scene and messages
    for row in range(16):
        scene = lookup.distinct_pair(rng)
        messages = lookup.lookup_messages(scene, rng, objects)
        first, second = scene.objects
        assert first.colour != second.colour and first.shape != second.shape
        truth = {}
        for obj in scene.objects:
            truth[colour_question(obj)], truth[shape_question(obj)] = obj.colour, obj.shape
        asked = [message["content"].split("\n")[-1].split(". ")[-1] for message in messages[::2]]
        assert [truth[question] for question in asked] == [message["content"] for message in messages[1::2]]
        text = processor.tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
        assert (OBJECT_TOKENS[first.name] in text) == (objects != "words")
        assert (f" {first.colour} {first.shape}" in text) == (objects == "words")
        assert ("<empty>" in text) == (objects == "cells")
        labelled = processor.tokenizer.decode(batch["labels"][row][batch["labels"][row] != -100])
        assert labelled == "".join(f"{message['content']}<|im_end|>" for message in messages[1::2])


def test_mixed_embeddings_add_the_other_objects_share():
    model = torch.nn.Module()
    table = torch.nn.Embedding(10, 4)
    model.get_input_embeddings = lambda: table
    input_ids = torch.tensor([[1, 8, 2, 9, 3], [1, 8, 2, 3, 4]])  # objects 8 and 9; the second row has one object
    mixed = lookup.mixed_embeddings(model, input_ids, torch.tensor([8, 9]), 0.5)
    plain = table(input_ids)
    assert torch.allclose(mixed[0, 1], plain[0, 1] + 0.5 * plain[0, 3])
    assert torch.allclose(mixed[0, 3], plain[0, 3] + 0.5 * plain[0, 1])
    assert torch.equal(mixed[0, [0, 2, 4]], plain[0, [0, 2, 4]]) and torch.equal(mixed[1], plain[1])


def test_first_answer_token_accuracy_scores_the_first_token_of_each_answer():
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7, 6]])
    logits = torch.zeros(1, 7, 10)
    logits[0, 1, 5] = logits[0, 4, 3] = 1.0  # first answer right, second wrong; the rest of each answer ignored
    logits[0, 2, 0] = 1.0
    assert lookup.first_answer_token_accuracy(logits, labels) == 0.5


def test_lookup_training_runs_and_the_command_checks_its_options(processor, capsys, monkeypatch):
    configs = []
    monkeypatch.setattr(lookup, "Qwen2Config", lambda **values: configs.append(values) or Qwen2Config(**values))
    history = lookup.train_lookup(processor, objects="cells", mixing=0.5, attention_heads=4, key_value_heads=2,
                                  steps=2, batch_size=4, log_every=1)
    assert [step for step, _ in history] == [1, 2] and all(0 <= accuracy <= 1 for _, accuracy in history)
    assert configs[0]["num_attention_heads"] == 4 and configs[0]["num_key_value_heads"] == 2
    with pytest.raises(SystemExit):
        lookup.main(["model-folder", "--mixing", "0.5"])
    assert "--mixing mixes object tokens: it needs --objects tokens or cells" in capsys.readouterr().err
