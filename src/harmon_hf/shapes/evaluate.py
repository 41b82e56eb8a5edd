"""ShapesEval: generation judged by the detector per GenEval-like category, understanding by exact match per
question type, both on held-out combinations only."""

import time

import torch
from tqdm.auto import tqdm

from ..answering import image_question
from .cases import GENERATION_CATEGORIES, generation_cases, understanding_cases
from .world import QUESTION_TYPES


def _summary(correct: dict[str, list[bool]]) -> dict[str, float]:
    """Accuracy per category and `overall`, their mean (GenEval's overall score)."""
    scores = {name: sum(results) / len(results) for name, results in correct.items() if results}
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".!")


@torch.no_grad()
def evaluate_generation(pipeline, count: int, seed: int = 0, batch_size: int = 25, progress=None,
                        **sampling) -> tuple[dict[str, float], float]:
    """Generate one image per held-out prompt and judge it; returns (scores, seconds per image). `sampling` goes to
    the pipeline (num_iter, num_inference_steps, guidance_scale, ...)."""
    cases = generation_cases(count, seed)
    correct = {category: [] for category in GENERATION_CATEGORIES}
    elapsed = 0.0
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        began = time.perf_counter()
        images = pipeline([case.prompt for case in batch], generator=torch.Generator().manual_seed(seed + start),
                          **sampling).images
        elapsed += time.perf_counter() - began
        for case, image in zip(batch, images):
            correct[case.category].append(case.is_met_by(image))
        if progress is not None:
            progress.update(len(batch))
    return _summary(correct), elapsed / len(cases)


@torch.no_grad()
def answer_questions(model, processor, questions: list[str], images: list | None = None) -> list[str]:
    """Greedy, normalised answers to one question each: about its image, or in words alone when `images` is None."""
    if images is None:
        messages = [{"role": "user", "content": question} for question in questions]
    else:
        messages = [image_question(question) for question in questions]
    texts = [processor.apply_chat_template([message], add_generation_prompt=True) for message in messages]
    inputs = processor(text=texts, images=images).to(model.device)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)
    return [normalise_answer(answer) for answer in processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1]:])]


def evaluate_understanding(pipeline, count: int, seed: int = 0, batch_size: int = 50,
                           progress=None) -> dict[str, float]:
    """Answer one question about each held-out image, greedily; exact match with the one-word answer."""
    processor, model = pipeline.processor, pipeline.model
    cases = understanding_cases(count, seed)
    correct = {question_type: [] for question_type in QUESTION_TYPES}
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        answers = answer_questions(model, processor, [case.question for case in batch],
                                   [case.image(model.config.image_size) for case in batch])
        for case, answer in zip(batch, answers):
            correct[case.question_type].append(answer == case.answer)
        if progress is not None:
            progress.update(len(batch))
    return _summary(correct)


def shapes_eval(pipeline, count: int = 200, seed: int = 0, **sampling) -> dict:
    """Both halves of ShapesEval with `count` samples each:
    {"generation": {"overall", category...}, "understanding": {"overall", type...}, "seconds_per_image", "samples"}."""
    pipeline.set_progress_bar_config(disable=True)  # one bar for the whole evaluation, not one per batch
    with tqdm(total=2 * count, desc="ShapesEval", unit="sample") as progress:
        generation, seconds = evaluate_generation(pipeline, count, seed, progress=progress, **sampling)
        understanding = evaluate_understanding(pipeline, count, seed, progress=progress)
    return {"generation": generation, "understanding": understanding, "seconds_per_image": seconds,
            "samples": count}


def format_table(results: dict) -> str:
    lines = [f"ShapesEval on held-out combinations ({results['samples']} samples each)", ""]
    for half in ("generation", "understanding"):
        scores = results[half]
        lines.append(f"{half:<16} {'score':>6}")
        for name, value in scores.items():
            if name != "overall":
                lines.append(f"  {name:<14} {value:6.3f}")
        lines.append(f"  {'overall':<14} {scores['overall']:6.3f}")
        lines.append("")
    lines.append(f"seconds per generated image: {results['seconds_per_image']:.3f}")
    return "\n".join(lines)
