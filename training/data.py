"""Streamed training data: sources read with `datasets` (streaming=True), turned into task samples, mixed by ratio.

Every source is filtered for bad samples *before* the sources are interleaved, so a skipped sample is replaced by the
next good one of the same source and the mix stays as the recipe asks. Randomness of the data (shuffling, the
unconditional captions) comes from seeds and the sample's position in its stream, so a resumed run sees the same
samples as an uninterrupted one.
"""

import io
import itertools
import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from datasets import Features, IterableDataset, List, Value, interleave_datasets, load_dataset
from PIL import Image

from ..modeling.processing_harmon import UNCONDITIONAL_PROMPT
from .recipe import DataSource, Recipe


logger = logging.getLogger(__name__)

# Images outside these bounds are skipped, as in the reference's data loading.
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 10.0
# A source that gives this many unusable samples in a row is refused: its filtered stream would otherwise never yield
# (an endless source, such as the shapes world, with a wrong column or task spins forever).
MAX_UNUSABLE_IN_A_ROW = 1000
# A prepared sample: token ids, labels (-100 = no loss), the square RGB image as raw uint8 bytes (empty without one),
# why it is unusable (empty if it is fine), and the reasons of the bad samples skipped just before it in its source:
# the counts travel with the data, so they reach the trainer from any dataloader worker.
SAMPLE_FEATURES = Features({
    "task": Value("string"),
    "input_ids": List(Value("int32")),
    "labels": List(Value("int32")),
    "image": Value("binary"),
    "skip_reason": Value("string"),
    "skipped_before": List(Value("string")),
})
_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}
# Tasks trained by next-token prediction, whose batches carry labels; the others are diffusion losses on an image.
LABELLED_TASKS = ("image_to_text", "text")
# Requests of the reconstruction task, worded for this project after RecA's: each asks for the whole image in detail.
RECONSTRUCTION_REQUESTS = (
    "Describe every detail of this image.",
    "Reproduce this image exactly: its objects, colours, shapes, sizes and positions.",
    "List everything in the image, with where each thing is.",
    "Give a complete visual description of this picture.",
    "Capture every element of the image: what it is, its colour, its size and its place.",
    "Walk through the whole scene, from top to bottom.",
    "Note the style, colours, shapes, textures, text and layout of this image.",
    "What does this image show, in full detail?",
)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(Exception):
    """A sample that cannot be used; its message is the reason, counted in the logs."""


# -- reading ---------------------------------------------------------------------------------------------------------


def _release_rows(data_info: str, caption_folder: str | None, caption_key: str):
    """The release's fine-tuning layout: a JSON list of {"image": ..., "caption" | "annotation": ...}."""
    for entry in json.loads(Path(data_info).read_text()):
        row = {"image": entry["image"]}
        if "annotation" in entry:
            try:
                caption = json.loads((Path(caption_folder) / entry["annotation"]).read_text())[caption_key]
            except (OSError, ValueError, KeyError) as error:
                caption = None
                row["error"] = f"unreadable caption file {entry['annotation']} ({type(error).__name__})"
            row["text"] = caption
        else:
            row["text"] = entry.get(caption_key)
        yield row


def open_source(source: DataSource, seed: str = "0") -> IterableDataset:
    """The raw rows of a source, streamed. `seed` seeds generated sources (the shapes world)."""
    path = Path(source.path)
    if source.format == "shapes":  # the synthetic world, rendered on the fly
        from harmon_hf.shapes.world import shapes_dataset

        return shapes_dataset(split=source.path, seed=seed)
    if source.format == "harmon_release":
        return IterableDataset.from_generator(
            _release_rows,
            gen_kwargs={"data_info": source.path, "caption_folder": source.caption_folder or str(path.parent),
                        "caption_key": source.caption_key},
        )
    builder = source.format
    if builder == "auto":
        if path.is_dir():
            builder = "imagefolder"
        elif path.suffix in _BUILDER_BY_SUFFIX:
            builder = _BUILDER_BY_SUFFIX[path.suffix]
        elif "*" in source.path:
            builder = _BUILDER_BY_SUFFIX.get(Path(source.path.replace("*", "x")).suffix, "hub")
        else:
            builder = "hub"
    if builder == "hub":
        return load_dataset(source.path, split=source.split, streaming=True)
    if builder == "imagefolder":
        return load_dataset("imagefolder", data_dir=source.path, split=source.split, streaming=True)
    return load_dataset(builder, data_files=source.path, split=source.split, streaming=True)


def check_source(recipe: Recipe, index: int, processor):
    """Open source `index` of the recipe and prepare its samples until the first usable one, so that a wrong path,
    column or task fails before any compute."""
    source = recipe.data[index]
    try:
        rows = iter(open_source(source, seed=f"{recipe.seed}/{index}"))
        first = next(rows)
    except StopIteration:
        raise ValueError(f"data source {source.path!r} is empty") from None
    except Exception as error:
        raise ValueError(f"cannot open data source {source.path!r}: {error}") from error
    builder = SampleBuilder(recipe, source, index, processor)  # raises after MAX_UNUSABLE_IN_A_ROW bad samples
    for position, row in enumerate(itertools.chain([first], rows)):
        if is_usable(builder(row, position)):
            return
    raise ValueError(f"data source {source.path!r} has no usable sample in its {position + 1} rows: "
                     f"{describe_reasons(builder.skipped)}")


# -- turning rows into samples ---------------------------------------------------------------------------------------


def chat_ids(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation in the chat template, and its labels: the ids of what the assistant writes (its
    answers and their `<|im_end|>`, as the template's `{% generation %}` marks them), -100 elsewhere.

    The tokenizer renders the processor's template, so each `<image>` stays one token here: the caller expands it to
    the placeholders of the recipe's image size.
    """
    encoding = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=True,
                                                       return_dict=True, return_assistant_tokens_mask=True)
    input_ids = list(encoding["input_ids"])
    labels = [token if in_answer else -100 for token, in_answer in zip(input_ids, encoding["assistant_masks"])]
    return input_ids, labels


class SampleBuilder:
    """Turns a raw row of one source into a training sample of its task (token ids, labels, pixels)."""

    def __init__(self, recipe: Recipe, source: DataSource, source_index: int, processor):
        self.recipe, self.source, self.source_index = recipe, source, source_index
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_base = Path(source.image_folder) if source.image_folder else (
            Path(source.path).parent if Path(source.path).is_file() else Path(source.path)
        )
        self.skipped: list[str] = []  # reasons of the bad samples since the last good one
        self.reasons_seen: set[str] = set()

    def __call__(self, row: dict, index: int) -> dict:
        try:
            if row.get("error"):
                raise BadSample(row["error"])
            sample = getattr(self, self.source.task)(row, index)
        except BadSample as reason:
            if str(reason) not in self.reasons_seen:
                logger.warning("skipping samples of %s: %s", self.source.path, reason)
                self.reasons_seen.add(str(reason))
            self.skipped.append(str(reason))
            if len(self.skipped) >= MAX_UNUSABLE_IN_A_ROW:
                raise ValueError(f"data source {self.source.path!r} gave {len(self.skipped)} unusable samples in a "
                                 f"row: {describe_reasons(self.skipped)}") from None
            return {"task": self.source.task, "input_ids": [], "labels": [], "image": b"", "skip_reason": str(reason),
                    "skipped_before": []}
        skipped, self.skipped = self.skipped, []
        return {**sample, "skip_reason": "", "skipped_before": skipped}

    # one method per task -------------------------------------------------------------------------------------------

    def text_to_image(self, row: dict, index: int) -> dict:
        caption = self._text(row)
        rng = random.Random(f"{self.recipe.seed}/{self.source_index}/{index}")
        if rng.random() < self.recipe.unconditional_probability:
            prompt = self.processor.apply_unconditional_template()
        else:
            prompt = self.processor.apply_generation_template(caption)
        input_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"task": "text_to_image", "input_ids": input_ids, "labels": [], "image": self._square(row, "generation")}

    def reconstruction(self, row: dict, index: int) -> dict:
        """RecA: the image in an understanding prompt that asks for it in detail; the model learns to draw that same
        image from its own features (no caption needed). As in RecA, the request is drawn from a list, and replaced
        by the unconditional request with the recipe's `unconditional_probability` (the image stays in the
        prompt)."""
        rng = random.Random(f"{self.recipe.seed}/{self.source_index}/{index}")
        request = rng.choice(RECONSTRUCTION_REQUESTS)
        if rng.random() < self.recipe.unconditional_probability:
            request = UNCONDITIONAL_PROMPT
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        input_ids = self._expand_image(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return {"task": "reconstruction", "input_ids": input_ids, "labels": [], "image": self._square(row, "generation")}

    def image_to_text(self, row: dict, index: int) -> dict:
        if self.source.conversations_column:
            messages = self._conversation(row)
        else:
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.source.instruction}]},
                {"role": "assistant", "content": self._text(row)},
            ]
        input_ids, labels = self._chat_ids(messages)
        if input_ids.count(self.processor.image_token_id) != 1:
            raise BadSample("conversation without exactly one <image>")
        position = input_ids.index(self.processor.image_token_id)
        input_ids = self._expand_image(input_ids)
        labels[position : position + 1] = [-100] * self.processor.num_image_tokens(self.recipe.image_size)
        return {"task": "image_to_text", "input_ids": input_ids, "labels": labels,
                "image": self._square(row, "understanding")}

    def text(self, row: dict, index: int) -> dict:
        if self.source.conversations_column:
            input_ids, labels = self._chat_ids(self._conversation(row))
        else:
            input_ids = self.tokenizer(self._text(row) + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            labels = list(input_ids)
        if self.processor.image_token_id in input_ids:
            raise BadSample("text sample with an <image> marker")
        return {"task": "text", "input_ids": input_ids, "labels": labels, "image": b""}

    # helpers --------------------------------------------------------------------------------------------------------

    def _text(self, row: dict) -> str:
        text = row.get(self.source.text_column)
        if not isinstance(text, str) or not text.strip():
            raise BadSample("empty text")
        if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) > self.recipe.max_text_tokens:
            raise BadSample(f"over-long text: more than {self.recipe.max_text_tokens} tokens")
        return text.strip()

    def _conversation(self, row: dict) -> list[dict]:
        turns = row.get(self.source.conversations_column)
        if not isinstance(turns, list) or not turns:
            raise BadSample("empty conversation")
        messages = []
        for turn in turns:
            role = _ROLES.get(turn.get("from", turn.get("role")))
            text = turn.get("value", turn.get("content"))
            if role is None or not isinstance(text, str):
                raise BadSample("conversation turn without a known role and text")
            if "<image>" in text:
                text = text.replace("<image>", "").strip()
                messages.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]})
            else:
                messages.append({"role": role, "content": text})
        if not any(m["role"] == "assistant" for m in messages):
            raise BadSample("conversation without an answer")
        return messages

    def _expand_image(self, input_ids: list[int]) -> list[int]:
        """The ids with their one `<image>` replaced by the placeholders of an image of the recipe's size."""
        position = input_ids.index(self.processor.image_token_id)
        placeholders = [self.processor.image_token_id] * self.processor.num_image_tokens(self.recipe.image_size)
        return input_ids[:position] + placeholders + input_ids[position + 1 :]

    def _chat_ids(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        input_ids, labels = chat_ids(self.processor, messages)
        if sum(label != -100 for label in labels) > self.recipe.max_text_tokens:
            raise BadSample(f"over-long text: more than {self.recipe.max_text_tokens} tokens")
        return input_ids, labels

    def _square(self, row: dict, mode: str) -> bytes:
        square = self.processor.image_processor.square_image(self._image(row), mode, self.recipe.image_size)
        return square.tobytes()

    def _image(self, row: dict) -> Image.Image:
        value = row.get(self.source.image_column)
        try:
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict) and value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            elif isinstance(value, dict) and value.get("path"):
                image = Image.open(self.image_base / value["path"])
            elif isinstance(value, str):
                image = Image.open(self.image_base / value)
            else:
                raise BadSample("no image")
            image.load()  # decode now: a truncated file fails here
        except BadSample:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise BadSample(f"unreadable image: {type(error).__name__}") from None
        width, height = image.size
        if min(width, height) <= MIN_IMAGE_SIDE:
            raise BadSample(f"tiny image: {width}x{height}")
        if max(width / height, height / width) >= MAX_ASPECT_RATIO:
            raise BadSample(f"extreme aspect ratio: {width}x{height}")
        return image.convert("RGB")


def is_usable(sample: dict) -> bool:
    return not sample["skip_reason"]


def count_reasons(reasons) -> Counter:
    """Skip reasons counted by kind: "tiny image: 6x40" counts as "tiny image"."""
    return Counter(reason.split(":")[0] for reason in reasons)


def describe_reasons(reasons) -> str:
    """The skip reasons counted by kind, the most frequent first: "empty text: 990, tiny image: 10"."""
    return ", ".join(f"{reason}: {count}" for reason, count in count_reasons(reasons).most_common())


def build_training_stream(recipe: Recipe, processor, rank: int = 0, world_size: int = 1) -> IterableDataset:
    """All sources, prepared, filtered and interleaved by their ratios; with several processes, each source is split
    between them first and every process interleaves its parts with the same seed, so that at every step all the
    processes train the same tasks (on different samples). Sharded training (FSDP, DeepSpeed ZeRO-3) needs that: a
    module's parameters are gathered by all the processes together, when the module runs."""
    streams, probabilities = [], []
    for index, source in enumerate(recipe.data):
        if source.ratio == 0:
            continue
        raw = open_source(source, seed=f"{recipe.seed}/{index}")
        if source.shuffle_buffer:
            raw = raw.shuffle(seed=recipe.seed + index, buffer_size=source.shuffle_buffer)
        builder = SampleBuilder(recipe, source, index, processor)
        samples = raw.map(builder, with_indices=True, features=SAMPLE_FEATURES).select_columns(list(SAMPLE_FEATURES))
        usable = samples.filter(is_usable)
        if world_size > 1:
            # Of every world_size usable samples in a row, this process takes the rank-th, and an incomplete last
            # group is dropped: every process then gets as many samples per pass, so their passes end at the same
            # step and the next pass's tasks stay in step too. (split_dataset_by_node gave them different orders.)
            usable = usable.map(lambda group: {column: values[rank:rank + 1] for column, values in group.items()},
                                batched=True, batch_size=world_size, drop_last_batch=True)
        streams.append(usable)
        probabilities.append(source.ratio)
    total = sum(probabilities)
    return interleave_datasets(streams, probabilities=[p / total for p in probabilities], seed=recipe.seed,
                               stopping_strategy="all_exhausted")


class HarmonDataCollator:
    """Groups a batch by task: {"text_to_image": {...}, "reconstruction": {...}, "image_to_text": {...},
    "text": {...}} (the tasks present)."""

    def __init__(self, pad_token_id: int, image_processor, image_size: int):
        self.pad_token_id = pad_token_id
        self.image_processor = image_processor
        self.image_size = image_size

    def __call__(self, samples: list[dict]) -> dict:
        """-> {task: tensors for each task present, "skipped": {reason: count} of the bad samples skipped}."""
        by_task = defaultdict(list)
        for sample in samples:
            by_task[sample["task"]].append(sample)
        batch = {task: self._collate(task, items) for task, items in by_task.items()}
        batch["skipped"] = dict(count_reasons(reason for s in samples for reason in s["skipped_before"]))
        return batch

    def _collate(self, task: str, items: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        for row, item in enumerate(items):
            count = len(item["input_ids"])  # right padding: prompts are read left to right in training
            input_ids[row, :count] = torch.tensor(item["input_ids"])
            attention_mask[row, :count] = 1
            if item["labels"]:
                labels[row, :count] = torch.tensor(item["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if task in LABELLED_TASKS:
            batch["labels"] = labels
        if items[0]["image"]:
            side = self.image_size
            squares = np.stack([np.frombuffer(item["image"], np.uint8).reshape(side, side, 3) for item in items])
            batch["pixel_values"] = torch.from_numpy(self.image_processor.normalize(squares))
        return batch
