"""Can an LLM of Harmon-Shapes' size learn to find the object a question names, and from what input?

A fresh LLM of Harmon-Shapes' text configuration is trained on conversations about two different objects ("What
colour is the square?", "What shape is the red object?"; colours and shapes all different, so every question needs
the named object found), with the objects given in `words` ("A red square and a blue circle."), as one token each in
a sentence (`tokens`: "A <red_square> and a <blue_circle>.") or as the image gives them, one token per cell
(`cells`: "<empty><empty><empty><red_square><empty><blue_circle><empty><empty><empty>", as the language stage's
`cells` conversations). `mixing` adds that share of the other object's token embedding to each object's, as an
image encoder that mixes its tokens would. It prints, every `log_every` steps, the share of held-out answers whose
first token is right: 0.5 is picking one of the two objects at random.

    python benchmarks/shapes/lookup.py MODEL_FOLDER [--objects words|tokens|cells] [--mixing 0.0]
        [--attention-heads N] [--key-value-heads N] [--steps 400] [--learning-rate 1e-3] [--seed 0]

MODEL_FOLDER gives the tokenizer and the chat template (a Harmon-Shapes folder, e.g. `harmon shapes init`'s).
"""

import argparse
import random
import time

import torch
from transformers import AutoProcessor, Qwen2Config, Qwen2ForCausalLM

from harmon_hf.shapes.build import SHAPES_TEXT_CONFIG
from harmon_hf.shapes.world import OBJECT_TOKENS, SCENE_OPENINGS, Scene, colour_question, sample_scene, shape_question
from harmon_hf.training.data import HarmonDataCollator, chat_ids


QUESTIONS_PER_CONVERSATION = 4
# How the two objects are given before the first question.
OBJECT_FORMS = {
    "words": SCENE_OPENINGS["words"],
    "tokens": lambda scene: "A {} and a {}. ".format(*(OBJECT_TOKENS[obj.name] for obj in scene.objects)),
    "cells": SCENE_OPENINGS["cells"],
}


def distinct_pair(rng: random.Random) -> Scene:
    """Two objects that differ in colour and in shape: every question about one of them needs it found."""
    while True:
        scene = sample_scene(rng, rng.choice(("pair", "relation")))
        first, second = scene.objects
        if first.colour != second.colour and first.shape != second.shape:
            return scene


def lookup_messages(scene: Scene, rng: random.Random, objects: str) -> list[dict]:
    """The scene's objects given as `objects` (one of OBJECT_FORMS), then questions about one of them."""
    opening = OBJECT_FORMS[objects](scene)
    messages = []
    for index in range(QUESTIONS_PER_CONVERSATION):
        named = rng.choice(scene.objects)
        question, answer = rng.choice([(colour_question(named), named.colour), (shape_question(named), named.shape)])
        messages.append({"role": "user", "content": opening + question if index == 0 else question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def lookup_batch(processor, rng: random.Random, size: int, objects: str) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (right-padded) and labels (the answers only) of `size` conversations."""
    samples = []
    for _ in range(size):
        input_ids, labels = chat_ids(processor, lookup_messages(distinct_pair(rng), rng, objects))
        samples.append({"task": "text", "input_ids": input_ids, "labels": labels, "image": b"", "skipped_before": []})
    collator = HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor,
                                  processor.image_processor.image_size)
    return collator(samples)["text"]


def mixed_embeddings(model, input_ids: torch.Tensor, object_token_ids: torch.Tensor, mixing: float) -> torch.Tensor:
    """Token embeddings where each object token also holds `mixing` times the other object token of its row."""
    embeddings = model.get_input_embeddings()(input_ids)
    mixed = embeddings.clone()
    for row in range(len(input_ids)):
        positions = torch.isin(input_ids[row], object_token_ids).nonzero().flatten()
        if len(positions) == 2:
            first, second = positions
            mixed[row, first] = embeddings[row, first] + mixing * embeddings[row, second]
            mixed[row, second] = embeddings[row, second] + mixing * embeddings[row, first]
    return mixed


def first_answer_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of answers whose first token is predicted right (the rest of a word follows from it)."""
    predicted, targets = logits[:, :-1].argmax(dim=-1), labels[:, 1:]
    first = (targets != -100) & (labels[:, :-1] == -100)
    return (predicted[first] == targets[first]).float().mean().item()


def train_lookup(processor, objects: str = "words", mixing: float = 0.0, attention_heads: int | None = None,
                 key_value_heads: int | None = None, steps: int = 400, learning_rate: float = 1e-3,
                 batch_size: int = 64, seed: int = 0, log_every: int = 100) -> list[tuple[int, float]]:
    """Train a fresh LLM on lookup conversations (`processor` gives the tokenizer and chat template), with
    `attention_heads` and `key_value_heads` instead of the configuration's where given; returns (step, held-out
    first-answer-token accuracy) every `log_every` steps."""
    object_token_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(OBJECT_TOKENS.values())))
    torch.manual_seed(seed)
    heads = {name: value for name, value in (("num_attention_heads", attention_heads),
                                              ("num_key_value_heads", key_value_heads)) if value}
    model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPES_TEXT_CONFIG, **heads, "vocab_size": len(processor.tokenizer)}))
    # The paper's optimiser settings (harmon train's defaults), warmed up over the first 20 steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.02)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    rng, held_out = random.Random(f"lookup/{seed}"), lookup_batch(processor, random.Random("lookup/held-out"), 256,
                                                                     objects)
    history, start = [], time.time()
    for step in range(1, steps + 1):
        batch = lookup_batch(processor, rng, batch_size, objects)
        embeddings = mixed_embeddings(model, batch["input_ids"], object_token_ids, mixing)
        loss = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
        if step % log_every == 0:
            with torch.no_grad():
                embeddings = mixed_embeddings(model, held_out["input_ids"], object_token_ids, mixing)
                logits = model(inputs_embeds=embeddings, attention_mask=held_out["attention_mask"]).logits
            history.append((step, first_answer_token_accuracy(logits, held_out["labels"])))
            print(f"step {step}: first answer token right {history[-1][1]:.3f} ({time.time() - start:.0f} s)",
                  flush=True)
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/shapes/lookup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Harmon-Shapes model folder (its tokenizer and chat template)")
    parser.add_argument("--objects", choices=list(OBJECT_FORMS), default="words",
                        help="how the objects are given: in words, one token each in a sentence, or one token per cell")
    parser.add_argument("--mixing", type=float, default=0.0, help="share of the other object in each object token")
    parser.add_argument("--attention-heads", type=int, help="query heads (default: the configuration's)")
    parser.add_argument("--key-value-heads", type=int, help="key/value heads (default: the configuration's)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of 64 conversations (400)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's learning rate (1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the LLM's initialisation and the training data (0)")
    args = parser.parse_args(argv)
    if args.mixing and args.objects == "words":
        parser.error("--mixing mixes object tokens: it needs --objects tokens or cells")
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    train_lookup(processor, args.objects, args.mixing, args.attention_heads, args.key_value_heads, args.steps,
                 args.learning_rate, seed=args.seed)


if __name__ == "__main__":
    main()
