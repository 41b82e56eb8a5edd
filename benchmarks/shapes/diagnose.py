"""Does a Harmon's image generation listen to its prompt, and if not, where is the prompt lost?

In the first round of sampling every token is masked, so the prompt is all that tells one image from another: it
reaches the diffusion head through the LLM's output at the buffer slots, `proj_out`, the MAR decoder's input and
the decoder's conditions. `prompt_influence` swaps each image's prompt for another's and measures how much of the
change survives at each of these steps.

`object_recall` asks the last step alone: with everything but one object's token visible and the scene described
in the prompt, does the diffusion head draw that object from its conditions?

`first_round_binding` asks the first step alone: with every token masked, what does the head draw in each cell, and
are the drawn objects the colour and shape the prompt asks for? (`colour_confusion` tabulates the colours.)

`answers_by_scene_kind` turns to understanding: the accuracy of answers per question type and kind of scene, about
the image or, without one, about the scene's description in words or in cell tokens. A question about one of two
objects ("What colour is the circle?") is answered only by finding the object it names; a model that reads the image
as one pooled object answers questions about single objects and fails these. `object_token_probe` asks whether the image features allow better:
how well a linear read-out of each object's own token at the LLM's input tells its colour and shape, and
`object_token_mixing` how much of that token is the other object's. `attention_to_named_object` asks where the
LLM looks: per layer, how much of the answer position's attention falls on the token of the object a question
names, and how much on the other object's.

`colour_separation` looks below the model, at the autoencoder's latents: how far apart two colours of the same shape
lie, next to how far an object lies from an empty cell. Colours close together there are the ones a diffusion head
most easily draws in place of each other.

    python benchmarks/shapes/diagnose.py MODEL [--count 32] [--recall-count 200] [--answer-count 300]
"""

import argparse
import math
import random

import torch

from harmon_hf import HarmonProcessor
from harmon_hf.answering import image_question
from harmon_hf.modeling import HarmonForConditionalGeneration
from harmon_hf.shapes.cases import understanding_cases
from harmon_hf.shapes.evaluate import answer_questions
from harmon_hf.shapes.vae import render_pixels
from harmon_hf.shapes.world import (CELLS, KINDS, PALETTE, QUESTION_TYPES, SCENE_OPENINGS, SHAPES, SIZES, Scene,
                                    ShapeObject, caption, cell_centre, cell_index, colour_question, describe, render,
                                    sample_split_scene, shape_question)


# What one cell of a single-object scene holds: nothing, or an object of one colour, shape and size.
CELL_CONTENTS = [None] + [(colour, shape, size) for colour in PALETTE for shape in SHAPES for size in SIZES]
RECALL_MEASURES = ("object", "colour", "shape", "empty")
# Whether a drawn cell content (colour, shape, size) is what was asked for (a ShapeObject), by measure.
MATCHES = {
    "object": lambda asked, drawn: drawn[:2] == (asked.colour, asked.shape),
    "colour": lambda asked, drawn: drawn[0] == asked.colour,
    "shape": lambda asked, drawn: drawn[1] == asked.shape,
}
# An object's attributes a read-out tells apart, and their values.
ATTRIBUTE_VALUES = {"colour": list(PALETTE), "shape": list(SHAPES)}
FIRST_ROUND_MEASURES = ("objects per image", "object", "colour", "shape")
# The steps from the LLM to the diffusion head, in order.
PROMPT_PATH = ("llm_output", "projected", "decoder_input", "conditions")


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return ((after - before).norm() / before.norm()).item()


def token_grid_side(model) -> int:
    """Tokens per side of the model's default image."""
    return model.config.image_size // model.config.vae_stride


def prompted_round(model, processor, texts: list[str], tokens: torch.Tensor, mask: torch.Tensor):
    """One sampling round of a square token grid: tokens (b, side * side, c), mask (b, side * side) with 1 = masked,
    one templated prompt per row, no prompt cache -> the model's round output (`encoded`, `conditions`)."""
    side = token_grid_side(model)
    inputs = processor.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)
    harmon = model.model
    return harmon.run_round(tokens, mask, (side, side), prompt_cache=None,
                            prompt_attention_mask=inputs["attention_mask"],
                            prompt_inputs_embeds=harmon.get_input_embeddings()(inputs["input_ids"]))


@torch.no_grad()
def prompt_influence(model, processor, count: int = 32, seed: int = 0) -> dict[str, float]:
    """{step of PROMPT_PATH: ||a - b|| / ||a||} for a = the values with `count` training captions, b = with the
    same captions rotated by one place, every image token masked. 0 means the prompt is ignored from that step on;
    a model that follows its prompt keeps a sizeable share of the change down to the conditions."""
    if count < 2:
        raise ValueError(f"count must be at least 2 (prompts are swapped between images), got {count}")
    rng = random.Random(f"prompt-influence/{seed}")
    scenes = [sample_split_scene(rng, "train") for _ in range(count)]
    prompts = [processor.apply_generation_template(caption(scene, rng)) for scene in scenes]
    side = token_grid_side(model)
    tokens = torch.zeros(count, side * side, model.config.token_channels, device=model.device)
    mask = torch.ones(count, side * side, device=model.device)

    def path_values(texts: list[str]) -> dict[str, torch.Tensor]:
        captured = {}
        hook = model.model.proj_out.register_forward_hook(
            lambda module, args, output: captured.update(llm_output=args[0], projected=output)
        )
        try:
            round_output = prompted_round(model, processor, texts, tokens, mask)
        finally:
            hook.remove()
        return {**captured, "decoder_input": round_output.encoded, "conditions": round_output.conditions}

    own, swapped = path_values(prompts), path_values(prompts[1:] + prompts[:1])
    return {step: relative_change(own[step], swapped[step]) for step in PROMPT_PATH}


def one_token_per_cell(model) -> int:
    """The token grid's side, checked to be the world's grid of cells (the diagnostics read one cell per token)."""
    side = token_grid_side(model)
    if side != CELLS:
        raise ValueError(f"these diagnostics need one token per cell of the world's {CELLS} x {CELLS} grid; this "
                         f"model has {side} x {side} tokens")
    return side


def cell_prototypes(model, cell: int) -> torch.Tensor:
    """(len(CELL_CONTENTS), c): the token at `cell` of a scene holding each of CELL_CONTENTS there, alone."""
    centre = cell_centre(cell % CELLS, cell // CELLS)
    scenes = [Scene("single", () if content is None else (ShapeObject(content[1], content[0], *centre, content[2]),))
              for content in CELL_CONTENTS]
    return model.encode_images(render_pixels(scenes, model.config.image_size)).flatten(1, 2)[:, cell]


def one_object_scenes(count: int, rng_seed: str) -> list[Scene]:
    """`count` training scenes of one object each."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = random.Random(rng_seed)
    return [sample_split_scene(rng, "train", "single") for _ in range(count)]


def read_tokens(model, cells: list[int], tokens: torch.Tensor) -> list:
    """What each of `tokens` (n, c) shows at its cell: the nearest of CELL_CONTENTS, each encoded alone there."""
    prototypes = {cell: cell_prototypes(model, cell) for cell in set(cells)}
    return [CELL_CONTENTS[(prototypes[cell] - token).norm(dim=-1).argmin()] for cell, token in zip(cells, tokens)]


def sample_without_guidance(model, conditions: torch.Tensor, seed: int) -> torch.Tensor:
    """The diffusion head's tokens (n, c) for conditions (n, d_dec), with the model's own sampler and steps."""
    head = model.model.diffusion_head
    scheduler = head.make_sampling_scheduler(model.image_generation_defaults["num_inference_steps"])
    return head.sample(conditions, scheduler, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def object_recall(model, processor, count: int = 200, seed: int = 0) -> dict[str, float]:
    """{measure of RECALL_MEASURES: share of `count` training scenes of one object}: the object's token is the only
    masked one, the prompt describes the scene (colour and shape), and the diffusion head samples the token without
    guidance. The sample is read as the nearest of what that cell can hold (each colour, shape and size, or nothing,
    encoded alone), so the true token scores 1.0 on `object`, `colour` and `shape`. `empty`: the head drew nothing."""
    side = one_token_per_cell(model)
    scenes = one_object_scenes(count, f"object-recall/{seed}")
    cells = torch.tensor([cell_index(scene.objects[0]) for scene in scenes])
    tokens = model.encode_images(render_pixels(scenes, model.config.image_size)).flatten(1, 2)  # (count, tokens, c)
    mask = torch.nn.functional.one_hot(cells, side * side).float().to(model.device)
    prompts = [processor.apply_generation_template(describe(scene)) for scene in scenes]
    conditions = prompted_round(model, processor, prompts, tokens, mask).conditions
    sampled = sample_without_guidance(model, conditions[mask.bool()], seed)

    hits = {measure: 0 for measure in RECALL_MEASURES}
    for scene, drawn in zip(scenes, read_tokens(model, cells.tolist(), sampled)):
        asked = scene.objects[0]
        hits["empty"] += drawn is None
        if drawn is not None:
            for measure, matches in MATCHES.items():
                hits[measure] += matches(asked, drawn)
    return {measure: hit / count for measure, hit in hits.items()}


@torch.no_grad()
def first_round_draws(model, processor, scenes: list[Scene], seed: int = 0) -> list[list]:
    """For each one-object scene: every token masked, the prompt describes the scene (colour and shape), and the
    diffusion head samples all tokens from this first round's conditions at once, without guidance. Returns, per
    scene, what each cell shows (`read_tokens`): None or (colour, shape, size)."""
    side = one_token_per_cell(model)
    count, num_tokens = len(scenes), side * side
    tokens = torch.zeros(count, num_tokens, model.config.token_channels, device=model.device)
    mask = torch.ones(count, num_tokens, device=model.device)
    prompts = [processor.apply_generation_template(describe(scene)) for scene in scenes]
    conditions = prompted_round(model, processor, prompts, tokens, mask).conditions  # (count, tokens, d)
    sampled = sample_without_guidance(model, conditions.flatten(0, 1), seed)
    drawn = read_tokens(model, list(range(num_tokens)) * count, sampled)
    return [drawn[start : start + num_tokens] for start in range(0, len(drawn), num_tokens)]


def first_round_scenes(count: int, seed: int = 0) -> list[Scene]:
    return one_object_scenes(count, f"first-round/{seed}")


def first_round_binding(scenes: list[Scene], draws: list[list]) -> dict[str, float]:
    """{measure of FIRST_ROUND_MEASURES}: the mean number of objects drawn per image (the prompt asks for one), and
    of the drawn objects, the share with the asked colour and shape (`object`), colour, and shape (nan if none)."""
    drawn = [(scene.objects[0], content) for scene, cells in zip(scenes, draws) for content in cells if content]
    total = len(drawn)

    shares = {measure: sum(matches(asked, content) for asked, content in drawn) / total if total else math.nan
              for measure, matches in MATCHES.items()}
    return {"objects per image": total / len(scenes), **shares}


def colour_confusion(scenes: list[Scene], draws: list[list]) -> dict[str, dict[str, int]]:
    """{asked colour: {drawn colour: objects drawn}} over the first round's drawn objects."""
    table = {asked: dict.fromkeys(PALETTE, 0) for asked in PALETTE}
    for scene, cells in zip(scenes, draws):
        for content in filter(None, cells):
            table[scene.objects[0].colour][content[0]] += 1
    return table


@torch.no_grad()
def colour_separation(model) -> dict:
    """{"colours": {colour: {colour: distance}}, "object to empty": distance}: the mean distance between the tokens of
    two colours of the same shape and size in the same cell, over every shape, size and cell, and the median distance
    of an object's token from the empty cell's, in the model's scaled latent units (unit standard deviation)."""
    one_token_per_cell(model)
    index = {content: position for position, content in enumerate(CELL_CONTENTS)}
    colours = list(PALETTE)
    distances, object_to_empty = torch.zeros(len(colours), len(colours)), []
    for cell in range(CELLS * CELLS):
        prototypes = cell_prototypes(model, cell).float()
        object_to_empty.append((prototypes[1:] - prototypes[0]).norm(dim=-1))
        for shape in SHAPES:
            for size in SIZES:
                tokens = prototypes[[index[(colour, shape, size)] for colour in colours]]
                distances += torch.cdist(tokens, tokens)
    distances /= CELLS * CELLS * len(SHAPES) * len(SIZES)
    table = {a: {b: distances[i, j].item() for j, b in enumerate(colours)} for i, a in enumerate(colours)}
    return {"colours": table, "object to empty": torch.cat(object_to_empty).median().item()}


def answers_by_scene_kind(model, processor, count: int = 300, seed: int = 0, about: str = "image",
                          batch_size: int = 50) -> dict[str, dict[str, float]]:
    """{question type: {scene kind: share of right answers}} to one question about each of `count` training scenes
    (the question types taking turns), about the scene's `image` or given as text, in `words` or `cells` (as the
    training data's `language` and `cells` conversations give it)."""
    asked = understanding_cases(count, seed, split="train")
    correct = {question_type: {kind: [] for kind in KINDS} for question_type in QUESTION_TYPES}
    for start in range(0, count, batch_size):
        batch = asked[start : start + batch_size]
        if about == "image":
            answers = answer_questions(model, processor, [case.question for case in batch],
                                       [case.image(model.config.image_size) for case in batch])
        else:
            answers = answer_questions(model, processor,
                                       [SCENE_OPENINGS[about](case.scene) + case.question for case in batch])
        for case, given in zip(batch, answers):
            correct[case.question_type][case.scene.kind].append(given == case.answer)
    return {question_type: {kind: sum(results) / len(results) for kind, results in by_kind.items() if results}
            for question_type, by_kind in correct.items()}


def two_object_tokens(model, count: int, seed: int, name: str) -> tuple[torch.Tensor, list, list]:
    """Each object's own token of the LLM's image features in `count` two-object training scenes: (tokens (2 *
    count, d), the objects, the other object of each one's scene), in the scenes' order."""
    one_token_per_cell(model)
    rng = random.Random(f"{name}/{seed}")
    scenes = []
    while len(scenes) < count:
        scene = sample_split_scene(rng, "train")
        if len(scene.objects) == 2 and scene.kind != "count":
            scenes.append(scene)
    features = model.model.get_image_features(render_pixels(scenes, model.config.image_size)).pooler_output  # (n, tokens, d)
    tokens = torch.stack([features[i, cell_index(obj)] for i, scene in enumerate(scenes) for obj in scene.objects])
    objects = [obj for scene in scenes for obj in scene.objects]
    others = [obj for scene in scenes for obj in reversed(scene.objects)]
    return tokens, objects, others


def attribute_one_hots(objects: list[ShapeObject]) -> torch.Tensor:
    """(n, colours + shapes): each object's colour and shape, one-hot."""
    return torch.cat([torch.nn.functional.one_hot(torch.tensor([values.index(getattr(obj, attribute))
                                                               for obj in objects]), len(values))
                      for attribute, values in ATTRIBUTE_VALUES.items()], dim=1).float()


@torch.no_grad()
def object_token_probe(model, count: int = 600, seed: int = 0) -> dict[str, float]:
    """{"colour", "shape": share read right}: a least-squares linear read-out of an object's attribute from its own
    token of the LLM's image features, fitted on the objects of `count` two-object training scenes and tested on
    those of another `count`. 1.0 means every object is told apart where it lies, so a model that answers about one
    of two objects at chance does not lose it in the image features."""
    tokens, objects, _ = two_object_tokens(model, 2 * count, seed, "object-token-probe")
    return {attribute: linear_read_out(tokens, [values.index(getattr(obj, attribute)) for obj in objects], len(values))
            for attribute, values in ATTRIBUTE_VALUES.items()}


@torch.no_grad()
def object_token_mixing(model, count: int = 600, seed: int = 0) -> float:
    """How much an object's token is the other object's: the token fitted (least squares) as a sum of a part set by
    its own object's colour and shape, a part set by the other object's, and a constant, over the objects of `count`
    two-object training scenes; the other part's size (root mean square over the objects) over the own part's.
    0 is a token of its own object alone; 1 one that holds both alike, so that no attention can pick out the object a
    question names by matching what it names (`python benchmarks/shapes/lookup.py MODEL --objects tokens --mixing M`
    measures how mixing slows an LLM's learning to)."""
    tokens, objects, others = two_object_tokens(model, count, seed, "object-token-mixing")
    own, other = attribute_one_hots(objects), attribute_one_hots(others)
    design = torch.cat([own, other, torch.ones(len(own), 1)], dim=1)
    weights = torch.linalg.lstsq(design, tokens.float(), driver="gelsd").solution
    width = own.shape[1]

    def part_size(one_hots: torch.Tensor, part_weights: torch.Tensor) -> torch.Tensor:
        part = one_hots @ part_weights
        return (part - part.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt()

    return (part_size(other, weights[width:2 * width]) / part_size(own, weights[:width])).item()


def linear_read_out(features: torch.Tensor, labels: list[int], classes: int) -> float:
    """The share of the second half of `features` (n, d) whose label a least-squares linear read-out (with a bias)
    fitted on the first half gets right."""
    rows = torch.cat([features.float(), torch.ones(len(features), 1)], dim=1)
    labels = torch.tensor(labels)
    fitted = len(rows) // 2
    targets = torch.nn.functional.one_hot(labels[:fitted], classes).float()
    weights = torch.linalg.lstsq(rows[:fitted], targets, driver="gelsd").solution
    return ((rows[fitted:] @ weights).argmax(dim=1) == labels[fitted:]).float().mean().item()


def named_object_questions(count: int, seed: int = 0) -> list[tuple[Scene, str, int, int]]:
    """`count` questions about one of two different objects of a training scene, "What colour is the circle?" or
    "What shape is the red object?": (scene, question, the named object's cell, the other object's cell)."""
    rng = random.Random(f"named-object/{seed}")
    asked = []
    while len(asked) < count:
        scene = sample_split_scene(rng, "train", rng.choice(("pair", "relation")))
        named, other = rng.sample(scene.objects, 2)
        if rng.random() < 0.5 and named.shape != other.shape:
            question = colour_question(named)
        elif named.colour != other.colour:
            question = shape_question(named)
        else:
            continue
        asked.append((scene, question, cell_index(named), cell_index(other)))
    return asked


def named_object_inputs(model, processor, asked: list) -> tuple[dict, torch.Tensor]:
    """The model's inputs for the questions of `named_object_questions`, each about its scene's image, and the
    position of each one's answer (its prompt's last token) -> (inputs, positions (count,))."""
    texts = [processor.apply_chat_template([image_question(question)], add_generation_prompt=True)
             for _, question, _, _ in asked]
    images = [render(scene, model.config.image_size) for scene, *_ in asked]
    inputs = processor(text=texts, images=images).to(model.device)
    mask = inputs["attention_mask"]
    return inputs, mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # the last real token, whichever the padding


@torch.no_grad()
def named_attribute_probe(model, processor, count: int = 300, seed: int = 0, batch_size: int = 100) -> list[dict]:
    """Per LLM layer, at its input: {"colour", "shape": share read right}: how well a linear read-out of the answer
    position's hidden state tells what the question names: the shape in "What colour is the circle?", the colour in
    "What shape is the red object?" (`linear_read_out`, about `count` questions of each kind fitted, as many
    tested). Near 1.0 from some layer on, the answer's position knows which object to look for; the image features
    (`object_token_probe`) are the other half of finding it."""
    asked = named_object_questions(4 * count, seed)
    states = []
    for start in range(0, len(asked), batch_size):
        inputs, answer_position = named_object_inputs(model, processor, asked[start : start + batch_size])
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # per layer input (b, seq, d)
        states.append(torch.stack([layer[torch.arange(len(answer_position)), answer_position] for layer in hidden], 1))
    states = torch.cat(states)  # (questions, layers + 1, d)
    named = {}  # attribute -> (rows, labels): a colour question names a shape, a shape question a colour
    for row, (scene, question, named_cell, _) in enumerate(asked):
        obj = next(obj for obj in scene.objects if cell_index(obj) == named_cell)
        attribute = "shape" if question == colour_question(obj) else "colour"
        rows, labels = named.setdefault(attribute, ([], []))
        rows.append(row)
        labels.append(ATTRIBUTE_VALUES[attribute].index(getattr(obj, attribute)))
    return [{attribute: linear_read_out(states[rows, layer], labels, len(ATTRIBUTE_VALUES[attribute]))
             for attribute, (rows, labels) in sorted(named.items())}
            for layer in range(states.shape[1] - 1)]  # the last hidden state is no layer's input


@torch.no_grad()
def attention_to_named_object(model, processor, count: int = 100, seed: int = 0) -> list[dict[str, float]]:
    """Per LLM layer: {"named", "other": the attention from the answer's position (the last of the prompt) on the
    named object's image token and on the other object's, averaged over heads and `count` questions of
    `named_object_questions`; "best head": the largest named-minus-other any head gives}. A model that finds the
    object a question names gives it clearly more than the other in some layer; one that reads the objects of the
    image together splits its attention evenly between them."""
    one_token_per_cell(model)
    asked = named_object_questions(count, seed)
    inputs, answer_position = named_object_inputs(model, processor, asked)
    language_model = model.model.language_model
    implementation = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")  # the fused kernels do not return their attention weights
    try:
        attentions = model(**inputs, output_attentions=True).attentions  # per layer (count, heads, seq, seq)
    finally:
        language_model.set_attn_implementation(implementation)
    # The image's placeholders hold the cells' tokens in row-major order, then the encoder's buffer.
    placeholders = [row.nonzero().flatten() for row in inputs["input_ids"] == model.config.image_token_id]
    named = torch.stack([places[named_cell] for places, (_, _, named_cell, _) in zip(placeholders, asked)])
    other = torch.stack([places[other_cell] for places, (_, _, _, other_cell) in zip(placeholders, asked)])
    rows = torch.arange(count)
    layers = []
    for attention in attentions:
        from_answer = attention[rows, :, answer_position].float()  # (count, heads, seq)
        on_named = from_answer[rows, :, named].mean(dim=0)  # (heads,)
        on_other = from_answer[rows, :, other].mean(dim=0)
        layers.append({"named": on_named.mean().item(), "other": on_other.mean().item(),
                       "best head": (on_named - on_other).max().item()})
    return layers


def print_colour_table(table: dict[str, dict[str, float]], number_format: str):
    """A {colour: {colour: number}} table, a row per colour, under a header of the colours."""
    print("  " + " " * 8 + "".join(f"{colour:>8}" for colour in PALETTE))
    for colour, row in table.items():
        print(f"  {colour:<8}" + "".join(f"{number:>8{number_format}}" for number in row.values()))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/shapes/diagnose.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Harmon-Shapes model folder")
    parser.add_argument("--count", type=int, default=32, help="prompts to swap (default 32)")
    parser.add_argument("--recall-count", type=int, default=200,
                        help="scenes for object recall and for the first round (default 200)")
    parser.add_argument("--answer-count", type=int, default=300,
                        help="questions for the answers by question type and kind of scene, and two-object scenes "
                             "for the token probe (default 300)")
    args = parser.parse_args(argv)
    model = HarmonForConditionalGeneration.from_pretrained(args.model).eval()
    processor = HarmonProcessor.from_pretrained(args.model)
    influence = prompt_influence(model, processor, args.count)
    print(f"share of a change of prompt left at each step, every token masked ({args.count} prompts):")
    for step, value in influence.items():
        print(f"  {step:<14} {value:.4f}")
    recall = object_recall(model, processor, args.recall_count)
    print(f"object recall, one object's token masked and drawn by the diffusion head ({args.recall_count} scenes):")
    for measure, value in recall.items():
        print(f"  {measure:<14} {value:.3f}")
    scenes = first_round_scenes(args.recall_count)
    draws = first_round_draws(model, processor, scenes)
    print(f"first round, every token masked and all drawn at once by the diffusion head ({args.recall_count} scenes "
          "of one object):")
    for measure, value in first_round_binding(scenes, draws).items():
        print(f"  {measure:<17} {value:.3f}")
    print("  colours drawn (rows: asked)")
    print_colour_table(colour_confusion(scenes, draws), "d")
    for about, what in (("image", "the image"), ("words", "its description, no image"),
                        ("cells", "its cells in tokens, no image")):
        table = answers_by_scene_kind(model, processor, args.answer_count, about=about)
        print(f"right answers by question type and kind of scene, about {what} ({args.answer_count} training "
              "scenes):")
        print("  " + " " * 9 + "".join(f"{kind:>10}" for kind in KINDS))
        for question_type, by_kind in table.items():
            print(f"  {question_type:<9}" + "".join(f"{by_kind[k]:>10.3f}" if k in by_kind else f"{'-':>10}"
                                                    for k in KINDS))
    named = named_attribute_probe(model, processor, args.answer_count)
    print(f"what a question about one of two objects names (its colour or shape), read linearly from the answer's "
          f"position at each layer's input (about {args.answer_count} questions of each kind fitted, as many tested):")
    for layer, shares in enumerate(named):
        print(f"  layer {layer:<8} " + "  ".join(f"{attribute} {share:.3f}" for attribute, share in shares.items()))
    layers = attention_to_named_object(model, processor, args.answer_count)
    print(f"attention from the answer's position on the named and the other object's image token "
          f"({args.answer_count} questions about one of two objects; mean over heads, and the best head's lead):")
    for layer, shares in enumerate(layers):
        print(f"  layer {layer:<8} named {shares['named']:.3f}  other {shares['other']:.3f}  "
              f"best head {shares['best head']:+.3f}")
    probe = object_token_probe(model, args.answer_count)
    print(f"an object's colour and shape read linearly from its own image token at the LLM's input "
          f"({args.answer_count} two-object scenes fitted, as many tested):")
    for attribute, value in probe.items():
        print(f"  {attribute:<14} {value:.3f}")
    mixing = object_token_mixing(model, args.answer_count)
    print(f"how much of an object's image token is the other object's (0: none, 1: as much as its own; "
          f"{args.answer_count} two-object scenes): {mixing:.3f}")
    separation = colour_separation(model)
    print(f"latent distance between colours (same shape, size and cell; an object from the empty cell: "
          f"{separation['object to empty']:.2f})")
    print_colour_table(separation["colours"], ".2f")


if __name__ == "__main__":
    main()
