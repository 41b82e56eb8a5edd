"""Model cards: the README.md, with the Hub's metadata, of every model folder harmon-hf writes: a converted release
(`harmon convert`), a trained model or LoRA adapter (`harmon train`) and a merged adapter (`harmon export-lora`)."""

import dataclasses
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData


CARD_FILE = "README.md"
TAGS = ["harmon", "mar", "image-generation", "visual-question-answering"]
# The Hub repository of the released checkpoints (harmon_*.pth and kl16.ckpt) that `harmon convert` reads.
RELEASE_REPOSITORY = "wusize/harmon"
# The release's license is the reference repository's (github.com/wusize/Harmon: S-Lab License 1.0, redistribution
# and use for non-commercial purposes only), which has no identifier of its own on the Hub.
RELEASE_LICENSE = {"license": "other", "license_name": "s-lab-license-1.0",
                   "license_link": "https://github.com/wusize/Harmon/blob/main/LICENSE"}
# What a model made from another model folder takes from that folder's card.
INHERITED_METADATA = ("base_model", "license", "license_name", "license_link")

# One template for every kind of folder (`kind`: conversion, training, adapter or merge). `model_path` is the folder
# as the command that wrote it was given it, so that the snippets run from where the command ran.
TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

[Harmon](https://arxiv.org/abs/2503.21979) (Wu et al., 2025) is one model for both sides of images: it generates
images from text and answers questions about them, through a MAR encoder shared between a Qwen2.5 language model
and a masked-autoregressive image decoder with a per-token diffusion head. This folder is in the transformers layout
of harmon-hf, with its model code, so that it loads with or without the `harmon_hf` package.
{%- set inherited_license -%}
{% if license %}
It keeps the license of `{{ start }}`: {% if license_link %}[{{ license_name }}]({{ license_link }}){% else %}{{ license }}{% endif %}.
{% endif %}
{%- endset %}
{% if kind == "conversion" %}
## Conversion

`harmon convert` made it, in {{ dtype }}, from the released checkpoint `{{ checkpoint }}` and the VAE `{{ vae }}`
{%- if base_model %} of [{{ base_model }}](https://huggingface.co/{{ base_model }}){% endif %}.
Every tensor of the release is mapped by an explicit renaming rule, and nothing else is changed: the converted model
reproduces the reference implementation's outputs. harmon-hf's `tests/test_parity.py` checks it: it converts a small
checkpoint of the reference implementation the same way and compares the VAE's latents and decoded images, the
visual features, the understanding logits and loss, every round and diffusion step of image generation and the
training losses with vectors recorded from the reference.

The license is the Harmon release's, [S-Lab License 1.0]({{ license_link }}): non-commercial use only.
{% elif kind in ("training", "adapter") %}
## Training

`harmon train` trained {% if kind == "adapter" %}this LoRA adapter on{% else %}it from{% endif %} `{{ start }}`
for {{ steps }} steps. The recipe, as run (`harmon train recipe.yaml` repeats it):

```yaml
{{ recipe }}```
{{ inherited_license }}{% else %}
## Origin

`harmon export-lora` made it from `{{ start }}` with the LoRA adapter `{{ adapter }}` merged into its weights.
{{ inherited_license }}{% endif %}
## Usage
{% if kind == "adapter" %}
The adapter changes `{{ start }}`; merged into it, it makes a normal model folder:

```bash
harmon generate "a red circle left of a blue square" --model {{ start }} --lora {{ model_path }} -o image.png
harmon export-lora --base {{ start }} --adapter {{ model_path }} --output merged-model
```

```python
from harmon_hf import HarmonForConditionalGeneration
from harmon_hf.training import load_with_adapter

model = load_with_adapter(HarmonForConditionalGeneration.from_pretrained("{{ start }}"), "{{ model_path }}")
```
{% else %}{% if not has_processor %}
This folder has no tokenizer (it was converted without `--tokenizer`): `AutoModel` loads the model, and answering,
`HarmonPipeline` and the `harmon` command need it converted again with `--tokenizer` and a Qwen2.5-Instruct
tokenizer.
{% endif %}
Generating an image with harmon-hf's `HarmonPipeline`:

```python
import torch
from harmon_hf import HarmonPipeline

pipe = HarmonPipeline.from_pretrained("{{ model_path }}")
image = pipe("a red circle left of a blue square", generator=torch.Generator().manual_seed(0)).images[0]
image.save("image.png")
```

Answering a question about it with transformers alone (the folder's model code, `trust_remote_code=True`):

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{{ model_path }}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{{ model_path }}", trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image", "image": "image.png"},
                                         {"type": "text", "text": "What is in the image?"}]}]
inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                       return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1]:])[0])
```

And with the `harmon` command:

```bash
harmon generate "a red circle left of a blue square" --model {{ model_path }} --seed 0 -o image.png
harmon describe image.png "What is in the image?" --model {{ model_path }}
harmon inpaint image.png mask.png "a green triangle" --model {{ model_path }} -o inpainted.png
```
{% endif %}"""


def inherited_metadata(model: str) -> dict:
    """The metadata a model made from `model` takes: a Hub id is its `base_model`; a folder passes on the
    `base_model` and license its own card names (a folder trained from a converted release descends from the
    release), and nothing when it has no readable card."""
    folder = Path(model)
    if not folder.is_dir():
        return {"base_model": model}
    card = folder / CARD_FILE
    if not card.is_file():  # checked here: `ModelCard.load` takes any other name for a Hub id and downloads it
        return {}
    try:
        data = ModelCard.load(card).data.to_dict()
    except (ValueError, yaml.YAMLError):  # metadata that is not YAML, or not a mapping
        return {}
    return {key: data[key] for key in INHERITED_METADATA if data.get(key)}


def _card(kind: str, title: str, model_path: "str | Path", metadata: dict, library_name: str = "transformers",
          tags: tuple[str, ...] = (), **template_values) -> ModelCard:
    data = ModelCardData(library_name=library_name, pipeline_tag="any-to-any", tags=[*TAGS, *tags], **metadata)
    return ModelCard.from_template(data, template_str=TEMPLATE, kind=kind, title=title, model_path=str(model_path),
                                   **template_values)


def conversion_card(model_path: "str | Path", checkpoint: "str | Path", vae: "str | Path", release: str | None,
                    dtype: str, has_processor: bool) -> ModelCard:
    """The card of a converted release; `release` ("0.5b", "1.5b", "1.5b-o") names the release when the
    configuration does, which makes the release's Hub repository the `base_model`."""
    metadata = dict(RELEASE_LICENSE)
    if release is not None:
        metadata["base_model"] = RELEASE_REPOSITORY
    title = f"Harmon-{release.upper()}" if release is not None else Path(model_path).name
    return _card("conversion", title, model_path, metadata, checkpoint=Path(checkpoint).name, vae=Path(vae).name,
                 dtype=dtype, has_processor=has_processor)


def training_card(model_path: "str | Path", recipe, steps: int) -> ModelCard:
    """The card of `harmon train`'s final folder: the model, or with a `lora` section the adapter, trained by
    `recipe` (a `harmon_hf.training.Recipe`) for `steps` optimizer steps."""
    adapter = recipe.lora is not None
    metadata = inherited_metadata(recipe.model)
    if adapter and Path(recipe.model).is_dir():
        # An adapter's base_model is the model it loads onto; a folder's ancestor on the Hub is not that model.
        metadata.pop("base_model", None)
    recipe_yaml = yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)
    return _card("adapter" if adapter else "training", Path(recipe.output_dir).name, model_path, metadata,
                 library_name="peft" if adapter else "transformers", tags=("lora",) if adapter else (),
                 start=recipe.model, steps=steps, recipe=recipe_yaml, has_processor=True)


def merged_card(model_path: "str | Path", base: str, adapter: "str | Path") -> ModelCard:
    """The card of `harmon export-lora`'s folder: `base` with `adapter` merged."""
    return _card("merge", Path(model_path).name, model_path, inherited_metadata(base), start=base,
                 adapter=str(adapter), has_processor=True)
