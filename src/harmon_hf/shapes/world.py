"""The shapes world: scenes of one to three flat shapes, rendered anti-aliased, with captions and questions.

Every scene has a *combination*: the attributes its caption names together (a coloured shape, a count, a pair of
objects). A fixed, seeded share of the combinations is held out: `split="train"` never yields a scene whose combination
is held out, `split="heldout"` yields only those, so ShapesEval measures combinations the model never saw.
"""

import hashlib
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..modeling.processing_harmon import GENERATION_INSTRUCTION


SHAPES = ("circle", "square", "triangle")
PALETTE = {  # colour name -> RGB; far enough apart that a nearest-colour rule separates them after blurring
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 0),
    "purple": (140, 50, 180),
    "orange": (255, 140, 0),
}
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("zero", "one", "two", "three")
# Objects sit on a grid of CELLS x CELLS cells of CELL_SIZE px, one per latent token (a token is 2 x 2 latent pixels
# of the stride-8 autoencoder), each object centred in its cell. Aligned objects make each latent token one of a few
# patterns (empty, or one coloured shape of one size), which a model trained for minutes on a CPU can learn.
CELLS = 3
CELL_SIZE = 16
IMAGE_SIZE = CELLS * CELL_SIZE
# A caption settles the layout: every place is said or is the default one, so a caption describes one image up to
# the sizes (and the colour) it leaves unsaid. With random places (four-by-four grid, runs 1-10), what a cell holds
# in the first rounds of generation is a guess among many cells, and 45 minutes of training on two cores did not
# learn those guesses: an uncertain object came out in the asked colour 42 % of the time, and whole scenes 14.5 %.
# A region is one cell: (column, row).
REGIONS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "centre": (1, 1)}
DEFAULT_REGION = "centre"  # where a single object is when its caption does not say
REGION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
# Several objects of one kind, in a layout with an empty cell between any two of them.
COUNT_LAYOUTS = {2: ((0, 1), (2, 1)), 3: ((1, 0), (0, 2), (2, 2))}
# Relation of object A to object B: the axis and sign of B's centre minus A's centre. "A and B" is A left of B.
RELATIONS = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
PAIR_RELATION = "left of"
SIZES = {"small": 0.75, "big": 0.9375}  # bounding-box side over the cell side: 12 and 15 px
KINDS = ("single", "count", "pair", "relation")
SPLITS = ("train", "heldout")
QUESTION_TYPES = ("colour", "shape", "count", "position", "yes/no")
HELD_OUT_SHARE = 0.15
SUPERSAMPLE = 4  # drawn this many times larger, then downsampled: anti-aliased edges


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    x: float  # centre, in fractions of the canvas
    y: float
    size: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    kind: str  # single | count | pair | relation
    objects: tuple[ShapeObject, ...]
    region: str | None = None  # single: where the object is
    relation: str | None = None  # relation: objects[0] <relation> objects[1]

    @property
    def combination(self) -> tuple:
        """What the scene's captions name together; held-out scenes are chosen by this."""
        if self.kind == "single":
            return ("single", self.objects[0].colour, self.objects[0].shape)
        if self.kind == "count":
            return ("count", self.objects[0].colour, self.objects[0].shape, len(self.objects))
        # A pair of objects is held out whatever the order or relation, so "a red circle left of a blue square"
        # is as new to the model as "a blue square and a red circle".
        return ("pair", *sorted(obj.name for obj in self.objects))


def all_combinations() -> dict[str, list[tuple]]:
    objects = [(colour, shape) for colour in PALETTE for shape in SHAPES]
    names = sorted(f"{colour} {shape}" for colour, shape in objects)
    return {
        "single": [("single", colour, shape) for colour, shape in objects],
        "count": [("count", colour, shape, count) for colour, shape in objects for count in (2, 3)],
        "pair": [("pair", a, b) for i, a in enumerate(names) for b in names[i + 1:]],
    }


def _held_out_combinations() -> frozenset:
    """The same HELD_OUT_SHARE of each kind's combinations on every machine: the lowest by a fixed hash."""
    chosen = []
    for combinations in all_combinations().values():
        ranked = sorted(combinations, key=lambda c: hashlib.sha256(repr(c).encode()).hexdigest())
        chosen += ranked[: math.ceil(HELD_OUT_SHARE * len(combinations))]
    return frozenset(chosen)


HELD_OUT = _held_out_combinations()


def is_held_out(combination: tuple) -> bool:
    return combination in HELD_OUT


# -- sampling scenes ------------------------------------------------------------------------------------------------


def cell_centre(column: int, row: int) -> tuple[float, float]:
    """Centre of a cell, in fractions of the canvas."""
    return (column + 0.5) / CELLS, (row + 0.5) / CELLS


def region_box(region: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the box of the centres an object in `region` may have, in fractions of the canvas."""
    centre = cell_centre(*REGIONS[region])
    return (*centre, *centre)


def relation_cells(relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The cells of A and B in "A <relation> B": opposite sides of the middle cell along the relation's axis."""
    axis, sign = RELATIONS[relation]
    middle = CELLS // 2
    along = (middle - sign, middle + sign)
    return tuple((along[i], middle) if axis == 0 else (middle, along[i]) for i in range(2))


def _object(shape: str, colour: str, cell: tuple[int, int], size: str) -> ShapeObject:
    return ShapeObject(shape, colour, *cell_centre(*cell), size)


def _random_object_types(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """`count` different (colour, shape) pairs."""
    types = set()
    while len(types) < count:
        types.add((rng.choice(list(PALETTE)), rng.choice(SHAPES)))
    return rng.sample(sorted(types), count)


def sample_scene(rng: random.Random, kind: str | None = None) -> Scene:
    kind = kind or rng.choice(KINDS)
    if kind == "single":
        colour, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
        region = rng.choice(list(REGIONS))
        return Scene(kind, (_object(shape, colour, REGIONS[region], rng.choice(list(SIZES))),), region=region)
    if kind == "count":
        colour, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
        size = rng.choice(list(SIZES))
        cells = COUNT_LAYOUTS[rng.choice(list(COUNT_LAYOUTS))]
        return Scene(kind, tuple(_object(shape, colour, cell, size) for cell in cells))
    types = _random_object_types(rng, 2)
    sizes = [rng.choice(list(SIZES)), rng.choice(list(SIZES))]
    relation = rng.choice(list(RELATIONS)) if kind == "relation" else None
    cells = relation_cells(relation or PAIR_RELATION)
    objects = tuple(_object(shape, colour, cell, size) for (colour, shape), cell, size in zip(types, cells, sizes))
    return Scene(kind, objects, relation=relation)


def check_split(split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_split_scene(rng: random.Random, split: str, kind: str | None = None) -> Scene:
    """A scene of the split: `train` (combination not held out) or `heldout` (held out)."""
    check_split(split)
    while True:
        scene = sample_scene(rng, kind)
        if is_held_out(scene.combination) == (split == "heldout"):
            return scene


# -- rendering ------------------------------------------------------------------------------------------------------


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        half = SIZES[obj.size] * big / CELLS / 2
        cx, cy = obj.x * big, obj.y * big
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:  # pointing up, its base as wide as its height
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return canvas.resize((size, size), Image.Resampling.BOX)


# -- language -------------------------------------------------------------------------------------------------------


def plural(shape: str) -> str:
    return shape + "s"


def object_phrase(obj: ShapeObject, mention_size: bool = False, mention_colour: bool = True) -> str:
    words = " ".join([obj.size] * mention_size + [obj.colour] * mention_colour + [obj.shape])
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def describe(scene: Scene, mention_colour: bool = True, mention_size: bool = False,
             region_phrase: str | None = None) -> str:
    """The scene in words; a single object may leave out its colour, or add its size and where it is."""
    objects = scene.objects
    if scene.kind == "single":
        phrase = object_phrase(objects[0], mention_size, mention_colour)
        return f"{phrase} {region_phrase}" if region_phrase else phrase
    if scene.kind == "count":
        obj = objects[0]
        return f"{NUMBER_WORDS[len(objects)]} {obj.colour} {plural(obj.shape)}"
    link = "and" if scene.kind == "pair" else scene.relation
    return f"{object_phrase(objects[0])} {link} {object_phrase(objects[1])}"


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings of everything the scene's combination names."""
    if scene.kind == "single":
        mention_colour = rng.random() < 0.8
        mention_size = rng.random() < 0.3
        # Only the default place may go unsaid; without its colour the object is named by its place, so the caption
        # still tells it apart.
        placed = scene.region != DEFAULT_REGION or not mention_colour or rng.random() < 0.5
        region_phrase = rng.choice(REGION_PHRASES[scene.region]) if placed else None
        phrase = describe(scene, mention_colour, mention_size, region_phrase)
    else:
        phrase = describe(scene)
    if rng.random() < 0.3:
        phrase = rng.choice(("an image of {}", "a picture of {}", "{} on a white background")).format(phrase)
    return phrase


def colour_question(obj: ShapeObject) -> str:
    """The question that names `obj` by its shape and asks its colour."""
    return f"What colour is the {obj.shape}?"


def shape_question(obj: ShapeObject) -> str:
    """The question that names `obj` by its colour and asks its shape."""
    return f"What shape is the {obj.colour} object?"


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously: (type, question, one-word answer)."""
    asked = []
    objects = scene.objects
    shapes = [obj.shape for obj in objects]
    colours = [obj.colour for obj in objects]
    for obj in objects:
        if shapes.count(obj.shape) == 1:
            asked.append(("colour", colour_question(obj), obj.colour))
        if colours.count(obj.colour) == 1:
            asked.append(("shape", shape_question(obj), obj.shape))
    for shape in SHAPES:
        asked.append(("count", f"How many {plural(shape)} are there?", NUMBER_WORDS[shapes.count(shape)]))
    asked.append(("count", "How many shapes are there?", NUMBER_WORDS[len(objects)]))
    if scene.kind == "single":
        asked.append(("position", f"Where is the {objects[0].name}?", scene.region))
    if scene.kind == "relation":
        a, b = objects
        asked.append(("position", f"Where is the {a.name} relative to the {b.name}?",
                      scene.relation.removesuffix(" of")))
    names = {obj.name for obj in objects}
    for colour in PALETTE:
        for shape in SHAPES:
            asked.append(("yes/no", f"Is there a {colour} {shape}?", "yes" if f"{colour} {shape}" in names else "no"))
    return asked



def pick_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """A question of a random type (then a random one of that type), so every type is asked about as often."""
    asked = questions(scene)
    by_type = {t: [q for q in asked if q[0] == t] for t in QUESTION_TYPES}
    question_type = rng.choice([t for t in QUESTION_TYPES if by_type[t]])
    candidates = by_type[question_type]
    if question_type == "yes/no":  # as many yeses as noes
        wanted = rng.choice(("yes", "no"))
        candidates = [q for q in candidates if q[2] == wanted]
    return rng.choice(candidates)


# -- the dataset ----------------------------------------------------------------------------------------------------


QUESTIONS_PER_CONVERSATION = 3


def question_turns(asked: list[tuple[str, str, str]], opening: str) -> list[dict]:
    """The questions (type, question, answer) and their answers as turns; `opening` comes before the first."""
    turns = []
    for index, (_, question, answer) in enumerate(asked):
        turns.append({"from": "human", "value": opening + question if index == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def conversation(scene: Scene, rng: random.Random) -> list[dict]:
    """A LLaVA-style conversation of a few questions about the image (the image comes with the first)."""
    return question_turns([pick_question(scene, rng) for _ in range(QUESTIONS_PER_CONVERSATION)], opening="<image>\n")


def description_sentence(scene: Scene) -> str:
    """The scene as a sentence that settles every question about it (a single object's place included)."""
    region_phrase = REGION_PHRASES[scene.region][0] if scene.kind == "single" else None
    return f"{describe(scene, region_phrase=region_phrase).capitalize()}."


# A scene in one token per cell, in the order of the image's tokens (rows top to bottom, each left to right), as an
# image gives it to the LLM: the empty cell's token or the object's, which names its colour and shape.
EMPTY_CELL_TOKEN = "<empty>"
OBJECT_TOKENS = {f"{colour} {shape}": f"<{colour}_{shape}>" for colour in PALETTE for shape in SHAPES}
CELL_TOKENS = (EMPTY_CELL_TOKEN, *OBJECT_TOKENS.values())


def cell_index(obj: ShapeObject) -> int:
    """The object's token in the row-major token sequence of the CELLS x CELLS grid."""
    return int(obj.y * CELLS) * CELLS + int(obj.x * CELLS)


def cell_description(scene: Scene) -> str:
    cells = [EMPTY_CELL_TOKEN] * (CELLS * CELLS)
    for obj in scene.objects:
        cells[cell_index(obj)] = OBJECT_TOKENS[obj.name]
    return "".join(cells)


def finding_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """The questions about two different objects whose answer depends on which one the question names: the colour or
    shape of the one named by its other attribute, where one is relative to the other."""
    if scene.kind not in ("pair", "relation"):
        return []
    return [asked for asked in questions(scene) if asked[0] in ("colour", "shape", "position")]


# Finding the object a question names from one token per object forms late: a fresh LLM of this size trained on
# nothing else, 64 conversations of four such questions a step, was right 0.769 of the time after 200 steps and 0.994
# after 300 (`python benchmarks/shapes/lookup.py MODEL --objects cells`), so the cells conversations ask more
# questions, and about two objects only those that need the object found.
CELLS_QUESTIONS = 6


# How a conversation without an image gives the scene before its first question: in words, or in cell tokens where
# the image would be (the chat template puts a newline after the image).
SCENE_OPENINGS = {"words": lambda scene: f"{description_sentence(scene)} ",
                  "cells": lambda scene: f"{cell_description(scene)}\n"}


def cells_conversation(scene: Scene, rng: random.Random) -> list[dict]:
    """Questions about the scene in cell tokens, where the image would be: the language pre-training's stand-in for
    what a pretrained LLM brings to stage I, answering from one token per object, which this LLM does not learn from
    words in its budget. Stage I then aligns each cell's image features to what the LLM can already read."""
    finding = finding_questions(scene)
    asked = [rng.choice(finding) if finding else pick_question(scene, rng) for _ in range(CELLS_QUESTIONS)]
    return question_turns(asked, opening=SCENE_OPENINGS["cells"](scene))


def language_conversation(scene: Scene, rng: random.Random) -> list[dict]:
    """The world's instructions without an image, for the language pre-training that stands in for the paper's
    instruction-tuned Qwen2.5: a generation request restated (so the positions after a request carry what it asks
    for), or questions answered from a description that settles them all."""
    if rng.random() < 0.5:
        request = caption(scene, rng)
        return [{"from": "human", "value": GENERATION_INSTRUCTION.format(prompt=request)},
                {"from": "gpt", "value": request}]
    asked = [pick_question(scene, rng) for _ in range(QUESTIONS_PER_CONVERSATION)]
    return question_turns(asked, opening=SCENE_OPENINGS["words"](scene))


def _rows(split: str, seed: "int | str", size: int, limit: int | None):
    rng = random.Random(f"shapes/{split}/{seed}")
    index = 0
    while limit is None or index < limit:
        scene = sample_split_scene(rng, split)
        yield {"image": render(scene, size), "text": caption(scene, rng), "conversations": conversation(scene, rng),
               "language": language_conversation(scene, rng), "cells": cells_conversation(scene, rng),
               "kind": scene.kind}
        index += 1


def shapes_dataset(split: str = "train", seed: "int | str" = 0, size: int = IMAGE_SIZE, limit: int | None = None):
    """The shapes world as a streamed `datasets.IterableDataset` (endless unless `limit`): an image, a caption
    (`text`), a conversation of questions about it (`conversations`), one in words alone (`language`), the image's
    questions about the scene in cell tokens (`cells`) and the scene's kind."""
    check_split(split)  # now: the rows are generated lazily
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    from datasets import IterableDataset  # the training extra: rendering and judging scenes do not need it

    return IterableDataset.from_generator(_rows,
                                          gen_kwargs={"split": split, "seed": seed, "size": size, "limit": limit})


def corpus_texts(count: int = 20000, seed: int = 0) -> list[str]:
    """Captions, questions and answers of both splits: the text a tokenizer for this world must cover."""
    rng = random.Random(f"shapes/corpus/{seed}")
    texts = []
    for _ in range(count):
        scene = sample_scene(rng)
        texts.append(caption(scene, rng))
        texts.extend(f"{question} {answer}" for _, question, answer in questions(scene))
    return texts
