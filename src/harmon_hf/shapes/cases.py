"""ShapesEval's test cases, drawn from held-out scenes: prompts with what their image must show, and questions."""

import random
from dataclasses import dataclass

from PIL import Image

from .detector import Requirement, detect, satisfies
from .world import (IMAGE_SIZE, QUESTION_TYPES, REGION_PHRASES, Scene, describe, pick_question, render,
                    sample_split_scene)


# Category -> the kind of scene its prompts describe.
GENERATION_CATEGORIES = {"object": "single", "colour": "single", "count": "count", "two objects": "pair",
                         "position": "relation"}


@dataclass(frozen=True)
class GenerationCase:
    category: str
    prompt: str
    requirement: Requirement
    scene: Scene  # a scene the prompt describes (its render is a correct answer)

    def is_met_by(self, image: Image.Image) -> bool:
        """Whether the detector finds in `image` what the prompt asks for."""
        return satisfies(detect(image), self.requirement)


@dataclass(frozen=True)
class UnderstandingCase:
    question_type: str
    scene: Scene
    question: str
    answer: str

    def image(self, size: int = IMAGE_SIZE) -> Image.Image:
        return render(self.scene, size)


def generation_case(category: str, scene: Scene) -> GenerationCase:
    objects = scene.objects
    if category == "object":  # the shape and its place, not its colour
        prompt = describe(scene, mention_colour=False, region_phrase=REGION_PHRASES[scene.region][0])
        requirement = Requirement(((None, objects[0].shape, 1),), region=scene.region)
    else:
        prompt = describe(scene)
        if category in ("colour", "count"):
            requirement = Requirement(((objects[0].colour, objects[0].shape, len(objects)),))
        else:
            requirement = Requirement(tuple((obj.colour, obj.shape, 1) for obj in objects), relation=scene.relation)
    return GenerationCase(category, prompt, requirement, scene)


def generation_cases(count: int, seed: int = 0) -> list[GenerationCase]:
    """`count` prompts of held-out combinations, the categories taking turns."""
    rng = random.Random(f"shapes-eval/generation/{seed}")
    categories = list(GENERATION_CATEGORIES)
    return [
        generation_case(category, sample_split_scene(rng, "heldout", GENERATION_CATEGORIES[category]))
        for category in (categories[i % len(categories)] for i in range(count))
    ]


def understanding_cases(count: int, seed: int = 0, split: str = "heldout") -> list[UnderstandingCase]:
    """`count` questions about scenes of `split` (ShapesEval's: the held-out one), the question types taking turns."""
    # ShapesEval's held-out cases keep the seed they have always been drawn with, so its scores stay comparable.
    name = f"shapes-eval/understanding/{seed}" if split == "heldout" else f"shapes-eval/understanding/{split}/{seed}"
    rng = random.Random(name)
    cases = []
    while len(cases) < count:
        wanted = QUESTION_TYPES[len(cases) % len(QUESTION_TYPES)]
        scene = sample_split_scene(rng, split)
        question_type, question, answer = pick_question(scene, rng)
        if question_type == wanted:
            cases.append(UnderstandingCase(question_type, scene, question, answer))
    return cases
