"""lmms-eval's `harmon` model, run through lmms-eval's own command line on local tasks, offline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


MAX_NEW_TOKENS = 8
# (question, images, target kind): one image, two images, no image; targets are set from the answers (see below).
QUESTIONS = [
    ("What colour is the circle?", ["red.png"], "right"),
    ("How many shapes are there?", ["noise.png"], "wrong"),
    ("Are the two images the same?", ["red.png", "noise.png"], "right"),
    ("Describe the image.", [], "wrong"),
]
TASK_UTILS = '''from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / name).convert("RGB") for name in doc["images"]]


def doc_to_text(doc):
    return doc["question"]
'''
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
"""


def lmms_eval(*args, cwd, launcher=(sys.executable,)):
    """lmms-eval's command line, run as a module by `launcher` (Python, or torchrun), offline, with its caches in
    `cwd`."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(cwd / "hf")}
    return subprocess.run([*launcher, "-m", "lmms_eval", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def harmon_model(harmon_folder):
    from harmon_hf.lmms_eval_harmon import Harmon

    return Harmon(pretrained=str(harmon_folder), device="cpu", max_new_tokens="64")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    Image.new("RGB", (40, 32), (255, 0, 0)).save(folder / "red.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "noise.png")
    (folder / "utils.py").write_text(TASK_UTILS)
    return folder


def images_of(task_folder, names):
    return [Image.open(task_folder / name).convert("RGB") for name in names]


def write_task(folder, task, docs, extra):
    with open(folder / f"{task}.jsonl", "w") as data:
        data.writelines(json.dumps(doc) + "\n" for doc in docs)
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=folder / f"{task}.jsonl") + extra)


def read_output(output_folder, task):
    """(lmms-eval's results for `task`, its logged samples by doc_id)."""
    [results_file] = output_folder.glob("*/*_results.json")
    [samples_file] = output_folder.glob(f"*/*_samples_{task}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return json.loads(results_file.read_text())["results"][task], {sample["doc_id"]: sample for sample in samples}


@pytest.fixture(scope="module")
def question_task(harmon_model, task_folder):
    """The task "harmon_questions" in `task_folder`; returns its expected answers and its targets."""
    from harmon_hf.answering import answer, image_question

    # The answers of the project's answering path, one question at a time.
    answers = [answer(harmon_model.pipeline, [image_question(question, len(names))], images_of(task_folder, names),
                      MAX_NEW_TOKENS) for question, names, _ in QUESTIONS]
    # A stop string (the task's `until`) from the middle of the longest answer: lmms-eval answers end before it.
    longest = max(answers, key=len)
    assert len(longest) >= 2, f"the tiny model's answers are too short to test a stop string: {answers}"
    stop = longest[len(longest) // 2]
    expected = [text.split(stop, 1)[0].strip() for text in answers]
    assert expected != answers
    # Half the targets are the expected answers, half are not: exact match is 0.5 only for the same answers.
    targets = [text if kind == "right" else text + " (not the answer)" for text, (*_, kind) in zip(expected, QUESTIONS)]
    write_task(task_folder, "harmon_questions",
               [{"question": question, "images": names, "answer": target}
                for (question, names, _), target in zip(QUESTIONS, targets)],
               f"generation_kwargs:\n  max_new_tokens: {MAX_NEW_TOKENS}\n  until: [{json.dumps(stop)}]\n"
               "  temperature: 0\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return expected, targets


# One process answers in batches of 3 (the first mixes one, two and no images in one left-padded batch); two
# processes (torchrun, as `accelerate launch` starts them) answer two requests each, which the harness gathers.
@pytest.mark.parametrize("launcher", [[sys.executable],
                                      [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node", "2"]], ids=["one process", "two processes"])
def test_lmms_eval_scores_harmon_answers_as_the_answering_path_does(question_task, harmon_folder, task_folder,
                                                                    tmp_path, launcher):
    expected, targets = question_task
    result = lmms_eval("--model", "harmon", "--model_args", f"pretrained={harmon_folder},device=cpu",
                       "--batch_size", 3, "--tasks", "harmon_questions", "--include_path", task_folder,
                       "--output_path", tmp_path, "--log_samples", cwd=task_folder, launcher=launcher)
    # lmms-eval reports an error in its log and exits with 0.
    assert "Error during evaluation" not in result.stdout + result.stderr, result.stdout + result.stderr

    scores, samples = read_output(tmp_path, "harmon_questions")
    assert [samples[doc_id]["filtered_resps"] for doc_id in range(len(QUESTIONS))] == expected
    accuracy = np.mean([prediction == target for prediction, target in zip(expected, targets)])
    assert accuracy == 0.5
    assert scores["exact_match,none"] == accuracy


def test_loglikelihood_is_the_models_loss_on_the_continuation(harmon_model, task_folder):
    """lmms-eval's `multiple_choice` picks the choice of lowest value, as its models return their loss. (lmms-eval
    0.7's evaluator turns any loglikelihood result into a string, so its multiple_choice tasks fail for every model;
    this calls the model as the evaluator does.)"""
    from lmms_eval.api.instance import Instance

    from harmon_hf.answering import image_question

    processor, model = harmon_model.pipeline.processor, harmon_model.pipeline.model
    docs = [{"question": "Is the circle red?", "images": ["red.png"], "answer": "yes"},
            {"question": "Describe the image.", "images": [], "answer": "a circle"},
            {"question": "Are they the same?", "images": ["red.png", "noise.png"], "answer": "no"}]
    harmon_model.task_dict = {"choices": {"test": docs}}

    def doc_to_visual(doc):
        return images_of(task_folder, doc["images"])

    def prompt_of(doc):
        images = doc_to_visual(doc)
        return processor(text=processor.apply_chat_template([image_question(doc["question"], len(images))],
                                                            add_generation_prompt=True), images=images or None)

    # The continuation the model itself would start its first answer with (its greedy first token).
    with torch.no_grad():
        greedy_token = model(**prompt_of(docs[0])).logits[0, -1].argmax().item()
    greedy_text = processor.tokenizer.decode([greedy_token])
    assert processor.tokenizer(greedy_text, add_special_tokens=False).input_ids == [greedy_token]

    # (doc_id, continuation): a text, or the task's doc_to_target (as `output_type: loglikelihood` passes it).
    cases = [(0, " yes"), (0, " no"), (0, greedy_text), (1, lambda doc: doc["answer"]), (2, " no")]
    requests = [Instance(request_type="loglikelihood", idx=0,
                         arguments=(docs[doc_id]["question"], continuation, doc_to_visual, doc_id, "choices", "test"),
                         metadata={"task": "choices", "doc_id": doc_id, "repeats": 1})
                for doc_id, continuation in cases]
    results = harmon_model.loglikelihood(requests)

    for (doc_id, continuation), (loss, is_greedy) in zip(cases, results):
        # The model's own loss: the mean cross-entropy of the continuation's tokens after the prompt.
        text = continuation(docs[doc_id]) if callable(continuation) else continuation
        prompt = prompt_of(docs[doc_id])
        continuation_ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            output = model(input_ids=torch.cat([prompt["input_ids"], continuation_ids], dim=1),
                           pixel_values=prompt.get("pixel_values"),
                           labels=torch.cat([torch.full_like(prompt["input_ids"], -100), continuation_ids], dim=1))
        predicted = output.logits[0, prompt["input_ids"].shape[1] - 1:-1].argmax(dim=-1)
        assert loss == pytest.approx(output.loss.item(), rel=1e-4, abs=1e-5), (doc_id, text)
        assert is_greedy == bool((predicted == continuation_ids[0]).all()), (doc_id, text)
    assert [is_greedy for _, is_greedy in results] == [False, False, True, False, False]


def test_a_missing_pretrained_is_named_in_the_error(task_folder):
    result = lmms_eval("--model", "harmon", "--tasks", "mme", cwd=task_folder)
    output = result.stdout + result.stderr
    assert "ValueError: the harmon model needs pretrained=PATH_OR_HUB_ID in --model_args" in output, output


def test_generation_settings_follow_lmms_eval_conventions(harmon_model, harmon_folder):
    from harmon_hf.lmms_eval_harmon import Harmon

    assert harmon_model.generation_settings({}) == (64, [], {"do_sample": False})
    # MME's settings: greedy, its own length, the harness's default stop; top_p 1.0 and num_beams 1 change nothing.
    assert harmon_model.generation_settings({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                             "do_sample": False, "until": ["\n\n"]}) == (16, ["\n\n"],
                                                                                        {"do_sample": False})
    assert harmon_model.generation_settings({"temperature": 0.7, "top_p": 0.9, "until": "###"}) == (
        64, ["###"], {"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert harmon_model.generation_settings({"do_sample": True}) == (64, [], {"do_sample": True})
    assert harmon_model.generation_settings({"do_sample": True, "temperature": 0}) == (64, [], {"do_sample": False})
    assert harmon_model.generation_settings({"do_sample": False, "temperature": 0.7}) == (64, [], {"do_sample": False})
    with pytest.raises(ValueError, match="num_beams=4: harmon decodes greedily or samples"):
        harmon_model.generation_settings({"num_beams": 4})
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        Harmon(pretrained=str(harmon_folder), device="cpu", batch_size="auto")
