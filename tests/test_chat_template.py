"""The chat template marks what the assistant writes: transformers' assistant mask, and training's labels from it."""

import pytest
from PIL import Image
from transformers import AutoProcessor

from harmon_hf.training.data import chat_ids

QUESTION, ANSWER = "What colour is the circle?", "A red circle."
FOLLOW_UP, SECOND_ANSWER = "How many shapes are there?", "Two shapes."


@pytest.fixture(scope="module")
def processor(harmon_folder):
    return AutoProcessor.from_pretrained(harmon_folder)


def two_turns(image_part: dict) -> list[dict]:
    return [
        {"role": "user", "content": [image_part, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
        {"role": "user", "content": FOLLOW_UP},
        {"role": "assistant", "content": SECOND_ANSWER},
    ]


def marked_runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s in `mask`."""
    starts = [i for i, bit in enumerate(mask) if bit and (i == 0 or not mask[i - 1])]
    ends = [i + 1 for i, bit in enumerate(mask) if bit and (i + 1 == len(mask) or not mask[i + 1])]
    return list(zip(starts, ends))


def test_assistant_tokens_mask_marks_the_answers_and_their_end(processor):
    image = Image.new("RGB", (40, 60), (220, 30, 30))
    inputs = processor.apply_chat_template(two_turns({"type": "image", "image": image}), tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt")
    ids, mask = inputs["input_ids"][0], inputs["assistant_masks"][0].tolist()
    decode = processor.tokenizer.decode
    runs = marked_runs(mask)
    # Exactly the answers and the <|im_end|> that ends each, right after the assistant header: not the headers, the
    # "\n" after <|im_end|>, the questions or the image's placeholders (expanded after the template was rendered).
    assert [decode(ids[start:end]) for start, end in runs] == [f"{ANSWER}<|im_end|>", f"{SECOND_ANSWER}<|im_end|>"]
    assert all(decode(ids[:start]).endswith("<|im_start|>assistant\n") for start, _ in runs)
    assert all(decode(ids[end:]).startswith("\n") for _, end in runs)
    assert (ids == processor.image_token_id).sum() == processor.num_image_tokens()


def test_training_labels_are_the_assistant_answers(processor):
    input_ids, labels = chat_ids(processor, two_turns({"type": "image"}))
    rendered = processor.apply_chat_template(two_turns({"type": "image"}))
    assert input_ids == processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert input_ids.count(processor.image_token_id) == 1  # training expands it to the recipe's image size
    assert len(labels) == len(input_ids)
    assert all(label in (-100, token) for label, token in zip(labels, input_ids))
    labelled = [label for label in labels if label != -100]
    assert processor.tokenizer.decode(labelled) == f"{ANSWER}<|im_end|>{SECOND_ANSWER}<|im_end|>"
