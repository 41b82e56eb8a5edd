"""Training recipes: YAML files checked against these dataclasses before any compute starts."""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


TASKS = ("text_to_image", "reconstruction", "image_to_text", "text")
FORMATS = ("auto", "parquet", "json", "csv", "imagefolder", "webdataset", "harmon_release", "hub", "shapes")
# The modules of HarmonModel a recipe can train, freeze or give a learning rate. The LM head is tied to the
# embeddings of the language model, and the VAE is always frozen.
MODULES = ("language_model", "mar_encoder", "mar_decoder", "diffusion_head", "proj_in", "proj_out")
# training.on_nonfinite, the first being the default: what a non-finite loss or gradient does to the run.
ON_NONFINITE = ("stop", "skip")
RECIPES_FOLDER = Path(__file__).parent / "recipes"


class RecipeLoader(yaml.SafeLoader):
    """YAML as people write learning rates: PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass
class DataSource:
    """One stream of training samples for one task, drawn with probability `ratio` in the mix."""

    path: str  # Hub dataset id, a file, a glob, or a folder; with format "shapes": the split, train or heldout
    task: str  # text_to_image | reconstruction | image_to_text | text
    ratio: float
    format: str = "auto"
    split: str = "train"
    image_column: str = "image"  # text_to_image, reconstruction and image_to_text
    text_column: str = "text"  # caption for images, or plain text for the text task
    conversations_column: str | None = None  # LLaVA-style conversations / chat messages, instead of text_column
    image_folder: str | None = None  # base folder of relative image paths
    caption_folder: str | None = None  # harmon_release: folder of the caption JSON files
    caption_key: str = "caption"  # harmon_release: key of the caption in data_info.json or the caption files
    instruction: str = "Describe this image."  # image_to_text from captions: the question asked
    shuffle_buffer: int = 1000  # 0 disables shuffling


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names (suffixes) inside the model: the LLM projections by default; add "qkv", "proj", "fc1", "fc2"
    # for the MAR blocks and the diffusion head.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class Recipe:
    model: str  # the starting model: a folder or Hub id in this project's layout
    output_dir: str
    data: list[DataSource]
    learning_rates: dict[str, float]  # one per trainable module of MODULES
    frozen: list[str] = field(default_factory=list)
    image_size: int = 256
    loss_weights: dict[str, float] = field(default_factory=lambda: {task: 1.0 for task in TASKS})
    weight_decay: float = 0.02
    # text_to_image: captions replaced by "Generate an image."; reconstruction: the request replaced by it
    unconditional_probability: float = 0.1
    max_text_tokens: int = 512  # longer texts are skipped (and counted)
    seed: int = 0
    lora: LoraSettings | None = None
    # keyword arguments of transformers.TrainingArguments, and on_nonfinite: what a non-finite loss or gradient does
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self):
        for source in self.data:
            if source.task not in TASKS:
                raise ValueError(f"data source {source.path!r}: task must be one of {TASKS}, got {source.task!r}")
            if source.format not in FORMATS:
                raise ValueError(f"data source {source.path!r}: format must be one of {FORMATS}, got {source.format!r}")
            if source.ratio < 0:
                raise ValueError(f"data source {source.path!r}: ratio must be >= 0, got {source.ratio}")
        total = sum(source.ratio for source in self.data)
        if not self.data or not math.isclose(total, 1.0, abs_tol=1e-6):
            ratios = ", ".join(f"{s.path}: {s.ratio}" for s in self.data)
            raise ValueError(f"the data ratios must add up to 1, got {total:g} ({ratios})")
        for module, rate in self.learning_rates.items():
            if rate <= 0:
                raise ValueError(f"learning_rates.{module} must be a positive number, got {rate!r}")
        unknown = (set(self.learning_rates) | set(self.frozen)) - set(MODULES)
        if unknown:
            raise ValueError(f"unknown module(s) {sorted(unknown)} in learning_rates/frozen; modules are {MODULES}")
        untreated = [m for m in MODULES if m not in self.frozen and m not in self.learning_rates]
        if untreated and self.lora is None:
            raise ValueError(f"module(s) {untreated} are neither frozen nor given a learning rate")
        unknown_tasks = set(self.loss_weights) - set(TASKS)
        if unknown_tasks:
            raise ValueError(f"unknown task(s) {sorted(unknown_tasks)} in loss_weights; tasks are {TASKS}")
        if self.image_size <= 0 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if not 0 <= self.unconditional_probability <= 1:
            raise ValueError(f"unconditional_probability must be in [0, 1], got {self.unconditional_probability}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"training.on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}")

    @property
    def on_nonfinite(self) -> str:
        """What a non-finite loss or gradient does: "stop" the run (the default), or "skip" that optimizer step."""
        return self.training.get("on_nonfinite", ON_NONFINITE[0])

    @classmethod
    def load(cls, path: "str | Path", overrides: list[str] = ()) -> "Recipe":
        """Read a recipe file (or the name of a bundled recipe) and apply `key=value` overrides (dotted keys)."""
        path = Path(path)
        bundled = RECIPES_FOLDER / path.with_suffix(".yaml")
        if not path.is_file() and not path.is_absolute() and bundled.is_file():
            path = bundled
        if not path.is_file():
            raise ValueError(f"no such recipe: {path}")
        values = read_yaml(path.read_text(), f"recipe {path}") or {}
        for override in overrides:
            apply_override(values, override)
        return from_dict(cls, values, where="recipe")


def read_yaml(text: str, where: str):
    """`text` read with RecipeLoader; a syntax error is a ValueError of one line saying where."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{where} is not valid YAML: {problem}{place}") from None


def apply_override(values: dict, override: str):
    """`training.max_steps=10`, `learning_rates.mar_decoder=2e-4` or `data.0.ratio=0.5` (values are YAML)."""
    if "=" not in override:
        raise ValueError(f"overrides are key=value, got {override!r}")
    dotted, text = override.split("=", 1)
    keys = dotted.split(".")
    value = read_yaml(text, f"override {override!r}")
    target = values
    for depth, key in enumerate(keys):
        place = ".".join(keys[:depth]) or "the recipe"
        if isinstance(target, list):
            if not key.isdigit() or int(key) >= len(target):
                raise ValueError(f"override {override!r}: {place} is a list of length {len(target)}: the index must be "
                                 f"0 to {len(target) - 1}, got {key!r}")
            key = int(key)
        elif not isinstance(target, dict):
            raise ValueError(f"override {override!r}: {place} is {target!r}, not a mapping or a list")
        if depth == len(keys) - 1:
            target[key] = value
        else:
            target = target[key] if isinstance(target, list) else target.setdefault(key, {})


def from_dict(cls, values, where: str):
    """Build dataclass `cls` from a mapping, refusing keys it does not have (with their place in the recipe)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; known keys: {sorted(fields)}")
    for name, value in values.items():
        check_type(value, fields[name].type, name if cls is Recipe else f"{where}.{name}")
    kwargs = dict(values)
    if cls is Recipe:
        kwargs["data"] = [from_dict(DataSource, s, f"data[{i}]") for i, s in enumerate(values.get("data") or [])]
        if values.get("lora") is not None:
            kwargs["lora"] = from_dict(LoraSettings, values["lora"], "lora")
    missing = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing key(s) {missing} in {where}")
    return cls(**kwargs)


# What a value must be for each type annotated in the dataclasses above; a nested dataclass is written as a mapping.
_TYPE_RULES = {int: (int, "a whole number"), float: ((int, float), "a number"), str: (str, "a string"),
               dict: (dict, "a mapping"), list: (list, "a list")}


def check_type(value, annotation, where: str):
    """Refuse `value` unless it has the type of `annotation` (with the items of lists and the values of mappings)."""
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is types.UnionType:  # `X | None`
        if value is None:
            return
        (annotation,) = [argument for argument in arguments if argument is not type(None)]
        arguments = typing.get_args(annotation)
    kind = dict if dataclasses.is_dataclass(annotation) else typing.get_origin(annotation) or annotation
    accepted, rule = _TYPE_RULES[kind]
    if isinstance(value, bool) or not isinstance(value, accepted):  # YAML's true/false are not numbers here
        raise ValueError(f"{where} must be {rule}, got {value!r}")
    if kind is list and arguments:
        for index, item in enumerate(value):
            check_type(item, arguments[0], f"{where}[{index}]")
    if kind is dict and arguments:
        for key, item in value.items():
            check_type(item, arguments[1], f"{where}.{key}")
