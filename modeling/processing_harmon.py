"""HarmonProcessor: Harmon's chat template, image placeholders and text-to-image prompts around a Qwen2 tokenizer."""

import numbers
import re

from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessorMixin

from .image_processing_harmon import HarmonImageProcessor


IMAGE_TOKEN = "<image>"
GENERATION_INSTRUCTION = "Generate an image: {prompt}"
UNCONDITIONAL_PROMPT = "Generate an image."
# Qwen2.5's chat format without its default system turn, as Harmon was trained; an image part becomes "<image>\n".
# An assistant turn's answer and its <|im_end|> (what the model learns to write, up to where it stops) sit in
# {% generation %}, so `apply_chat_template(..., return_assistant_tokens_mask=True)` marks them. The "\n" after a
# turn is written as {{ '\n' }}: transformers renders templates with trim_blocks, which drops a newline after a tag.
CHAT_TEMPLATE = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render_content(message['content']) }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ render_content(message['content']) }}<|im_end|>{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_ASSISTANT_START = "<|im_start|>assistant\n"
_TURN_END = "<|im_end|>"
# Qwen2.5's chat format: an assistant turn ends with <|im_end|>, a text with <|endoftext|>.
END_TOKENS = (_TURN_END, "<|endoftext|>")


class HarmonProcessor(ProcessorMixin):
    r"""
    Combines [`HarmonImageProcessor`] and a Qwen2 tokenizer.

    Args:
        image_processor ([`HarmonImageProcessor`]): prepares the pixels.
        tokenizer: a Qwen2.5 tokenizer that knows the `<image>` token.
        num_buffer_tokens (`int`, defaults to 64): MAR buffer slots, appended to every image's features.
        chat_template (`str`, *optional*): defaults to Harmon's template (no system turn).
    """

    def __init__(self, image_processor=None, tokenizer=None, num_buffer_tokens: int = 64, chat_template=None, **kwargs):
        self.num_buffer_tokens = num_buffer_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: add it as a special token first")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The processor of a folder or Hub repository. Its image processor is the class beside this one, loaded by
        class rather than through `AutoImageProcessor`: a processor loaded as trusted code (a diffusers pipeline's
        component, which is given no `trust_remote_code` to pass on) then does not ask again for its own folder's
        image processor. Keyword arguments (`subfolder`, `revision`, `token`, ...) reach every part."""
        processor_config, _ = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        image_processor = HarmonImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   num_buffer_tokens=processor_config.get("num_buffer_tokens", 64),
                   chat_template=processor_config.get("chat_template"))

    @property
    def end_token_ids(self) -> list[int]:
        """The ids that end an answer: what the model's `generation_config.eos_token_id` holds."""
        return self.tokenizer.convert_tokens_to_ids(list(END_TOKENS))

    def num_image_tokens(self, size: int | None = None) -> int:
        """Placeholders per (square) image: one per latent token plus the buffer slots."""
        size = size or self.image_processor.image_size
        return (size // self.image_processor.vae_stride) ** 2 + self.num_buffer_tokens

    def __call__(self, text=None, images=None, padding=True, padding_side: str = "left", return_tensors="pt",
                 **kwargs) -> BatchFeature:
        """Understanding inputs: each `<image>` in `text` becomes the image's placeholders, in order.

        `text`: a string or a list (one sequence each, already in the chat template, e.g. from
        `apply_chat_template`); `images`: the images of all sequences in order of their `<image>` markers, flat or
        one list per sequence. Padded on the left by default, as `generate` expects. Other keywords follow
        [`~transformers.ProcessorMixin`]: tokenizer ones (`truncation`, `max_length`, `return_offsets_mapping`, ...)
        and `size` (the side images are resized to; the placeholders follow it).
        """
        if text is None:
            raise ValueError("HarmonProcessor needs text (with one <image> marker per image)")
        if isinstance(text, (list, tuple)) and not text:
            raise ValueError("text must hold at least one sequence, got an empty list")
        # Template text never needs the tokenizer's own special tokens (a Qwen2 tokenizer adds none anyway).
        kwargs.setdefault("add_special_tokens", False)
        return super().__call__(images=images, text=text, padding=padding, padding_side=padding_side,
                                return_tensors=return_tensors, **kwargs)

    def _process_images(self, images, **kwargs):
        # Chat templates give one list of images per conversation; the image processor takes one flat list.
        return super()._process_images(make_flat_list_of_images(images), **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The placeholders of image `image_idx`, for the side its `pixel_values` (n, 3, side, side) were resized to."""
        return self.image_token * self.num_image_tokens(image_inputs["pixel_values"].shape[-1])

    def apply_generation_template(self, prompt: str) -> str:
        return self.apply_chat_template(
            [{"role": "user", "content": GENERATION_INSTRUCTION.format(prompt=prompt)}], add_generation_prompt=True
        )

    def apply_unconditional_template(self) -> str:
        """Harmon's unconditional prompt, the one classifier-free guidance and training's caption dropout use."""
        return self.apply_chat_template([{"role": "user", "content": UNCONDITIONAL_PROMPT}], add_generation_prompt=True)

    def generation_inputs(self, prompts, negative_prompt=None, return_tensors="pt") -> BatchFeature:
        """Text-to-image prompts: the conditional rows, then as many unconditional rows (right-padded).

        The unconditional prompt is Harmon's "Generate an image." unless `negative_prompt` (one string, or one per
        prompt) takes its place in the same template as the prompts.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative_prompt is None:
            negative_texts = [self.apply_unconditional_template()] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
            negative_texts = [self.apply_generation_template(n) for n in negatives]
        texts = [self.apply_generation_template(p) for p in prompts] + negative_texts
        encoding = self.tokenizer(texts, padding=True, padding_side="right", add_special_tokens=False,
                                  return_tensors=return_tensors)
        return BatchFeature(dict(encoding), tensor_type=return_tensors)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """The assistant's answer in each sequence of generated ids ((b, L) or (L,), with or without the prompt):
        the text after the last `<|im_start|>assistant\n`, up to `<|im_end|>`, without special tokens unless
        `skip_special_tokens=False`. `decode` and `batch_decode` decode everything, as the tokenizer does."""
        if _is_one_sequence(generated_outputs):
            generated_outputs = [generated_outputs]
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=False, **kwargs)
        return [self._answer(text, skip_special_tokens) for text in texts]

    def _answer(self, text: str, skip_special_tokens: bool) -> str:
        if _ASSISTANT_START in text:
            text = text.rsplit(_ASSISTANT_START, 1)[1]
        text = text.split(_TURN_END, 1)[0]
        if skip_special_tokens:
            special = "|".join(re.escape(token) for token in self.tokenizer.all_special_tokens + [IMAGE_TOKEN])
            text = re.sub(special, "", text)
        return text.strip()


def _is_one_sequence(ids) -> bool:
    if hasattr(ids, "ndim"):
        return ids.ndim == 1
    return len(ids) > 0 and isinstance(ids[0], numbers.Integral)


__all__ = ["HarmonProcessor"]
