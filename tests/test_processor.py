"""HarmonImageProcessor and HarmonProcessor: pixels, chat template, placeholders, prompts and decoding."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from harmon_hf import HarmonImageProcessor, processor_for


@pytest.fixture(scope="module")
def processor(harmon_folder):
    return AutoProcessor.from_pretrained(harmon_folder)


def test_understanding_images_are_padded_with_grey_then_resized():
    image_processor = HarmonImageProcessor(image_size=64)
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    pixels = image_processor(wide, mode="understanding")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    grey = 127 / 255 * 2 - 1
    assert torch.allclose(pixels[0, :, 2, 32], torch.tensor([grey] * 3), atol=1e-6)  # padded band on top
    assert torch.allclose(pixels[0, :, 32, 32], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)  # the image, centred


def test_generation_targets_are_centre_cropped():
    image = Image.new("RGB", (96, 64), (0, 0, 255))
    image.paste((0, 255, 0), (0, 0, 16, 64))  # a green band that the centre crop removes
    pixels = HarmonImageProcessor(image_size=32)(image, mode="generation")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and torch.allclose(pixels[0, 1], torch.full((32, 32), -1.0), atol=1e-6)


def test_image_processor_refuses_bad_sizes_and_modes():
    with pytest.raises(ValueError, match="multiple of 16, got 100"):
        HarmonImageProcessor(image_size=100)
    with pytest.raises(ValueError, match="mode must be one of"):
        HarmonImageProcessor()(Image.new("RGB", (8, 8)), mode="edit")


def test_postprocess_matches_the_reference_rounding():
    pixels = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    array = HarmonImageProcessor.postprocess(pixels, "np")
    assert array[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]  # clamp(127.5 x + 128) truncated


def test_placeholders_expand_per_image(processor):
    assert processor.num_image_tokens() == (64 // 16) ** 2 + 4
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text, text], images=[Image.new("RGB", (40, 60))] * 2)
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [20, 20]
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    larger = processor(text=text, images=Image.new("RGB", (8, 8)), size=128)
    assert (larger["input_ids"] == processor.image_token_id).sum().item() == 8 * 8 + 4


def test_marker_and_image_counts_must_agree(processor):
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        processor(text="<image> what?", images=[Image.new("RGB", (8, 8))] * 2)
    with pytest.raises(ValueError, match="Found 1 <image> tokens in the text but no images"):
        processor(text="<image> what?")


def test_chat_template_is_harmons(processor):
    single = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    assert single == "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    multi = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Shape?"}],
        add_generation_prompt=True,
    )
    assert multi == ("<|im_start|>user\n<image>\nColour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
                     "<|im_start|>user\nShape?<|im_end|>\n<|im_start|>assistant\n")
    assert "system" not in multi


def test_padding_sides(processor):
    understanding = processor(text=["<image> a", "<image> a much longer question here"],
                              images=[Image.new("RGB", (8, 8))] * 2)
    assert understanding["attention_mask"][0, 0] == 0 and understanding["attention_mask"][0, -1] == 1  # left
    generation = processor.generation_inputs(["red", "a red circle left of a blue square"])
    mask = generation["attention_mask"]
    assert mask.shape[0] == 4 and mask[0, -1] == 0 and mask[0, 0] == 1 and mask[1].all()  # right, cond then uncond
    assert torch.equal(generation["input_ids"][2], generation["input_ids"][3])


def test_negative_prompt_takes_the_unconditional_slot(processor):
    plain = processor.generation_inputs(["red"])
    negative = processor.generation_inputs(["red"], negative_prompt="blurry")
    length = int(plain["attention_mask"][0].sum())
    assert torch.equal(plain["input_ids"][0, :length], negative["input_ids"][0, :length])
    decoded = processor.tokenizer.decode(negative["input_ids"][1], skip_special_tokens=False)
    assert "Generate an image: blurry" in decoded
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        processor.generation_inputs(["red"], negative_prompt=["a", "b"])


def test_post_processing_strips_the_chat_markup(processor):
    text = "<|im_start|>user\n<image>\nColour?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|><|endoftext|>"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.post_process_image_text_to_text([ids]) == ["A red circle."]
    answer_only = processor.tokenizer("A red circle.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert processor.post_process_image_text_to_text(answer_only) == ["A red circle."]
    assert processor.post_process_image_text_to_text(answer_only, skip_special_tokens=False) == ["A red circle."]


# Qwen2.5's ids, written out from the reference template: <|im_start|> 151644, user 872, "\n" 198, <|im_end|> 151645,
# assistant 77091, <image> 151665; "Generate an image" 31115 458 2168.
IM_START, USER, NEWLINE, IM_END, ASSISTANT, IMAGE = 151644, 872, 198, 151645, 77091, 151665
GENERATE_AN_IMAGE = [31115, 458, 2168]


@pytest.fixture(scope="module")
def qwen_processor():
    from harmon_hf.convert import add_image_token, release_config
    from offline_qwen import qwen2_5_tokenizer

    config = release_config("0.5b", image_size=256)
    return processor_for(config, add_image_token(qwen2_5_tokenizer(), config))


def test_generation_prompt_ids_under_qwen2_5(qwen_processor):
    inputs = qwen_processor.generation_inputs(["a red apple on a table"])
    conditional = [IM_START, USER, NEWLINE, *GENERATE_AN_IMAGE, 25, 264, 2518, 23268, 389, 264, 1965, IM_END, NEWLINE,
                   IM_START, ASSISTANT, NEWLINE]  # ": a red apple on a table"
    unconditional = [IM_START, USER, NEWLINE, *GENERATE_AN_IMAGE, 13, IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    assert inputs["input_ids"][0].tolist() == conditional
    length = int(inputs["attention_mask"][1].sum())
    assert inputs["input_ids"][1, :length].tolist() == unconditional


def test_understanding_prompt_ids_under_qwen2_5(qwen_processor):
    text = qwen_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    ids = qwen_processor(text=text, images=Image.new("RGB", (300, 200)))["input_ids"][0].tolist()
    expected = [IM_START, USER, NEWLINE, *[IMAGE] * (16 * 16 + 64), NEWLINE, 3838, 374, 304, 279, 2168, 30, IM_END,
                NEWLINE, IM_START, ASSISTANT, NEWLINE]
    assert ids == expected
