"""Model cards: every folder harmon-hf writes (converted, trained, LoRA adapter, merged) has a README.md whose Hub
metadata `ModelCard.load` reads back.

`ModelCard.validate` posts the card to the Hub's validation API, which these tests cannot reach (no network), so they
check the round trip offline: the metadata read back from the file equal what the card was made with, and they build
a `ModelCardData` again unchanged.
"""

import re

import pytest
from huggingface_hub import ModelCard, ModelCardData

from conftest import GOLDEN
from harmon_hf.convert import convert, release_name
from harmon_hf.model_card import (RELEASE_LICENSE, RELEASE_REPOSITORY, TAGS, conversion_card, inherited_metadata,
                                  training_card)
from harmon_hf.training import export_merged, train
from test_training import make_recipe
from tiny_data import write_caption_parquet


def _metadata(folder) -> dict:
    """The card's metadata as read back from the folder's README.md, checked to survive a ModelCardData round trip."""
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    return data


def _python_snippets(folder) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return write_caption_parquet(tmp_path_factory.mktemp("card-data") / "captions.parquet", count=8)


def test_converted_folder_has_a_card_whose_snippets_run(harmon_folder, tmp_path, monkeypatch):
    assert _metadata(harmon_folder) == {"library_name": "transformers", "pipeline_tag": "any-to-any", "tags": TAGS,
                                        **RELEASE_LICENSE}  # no base_model: the config is a file, not a release
    card = (harmon_folder / "README.md").read_text()
    assert "reproduces the reference implementation's outputs" in card and "tests/test_parity.py" in card
    assert "`harmon_tiny.pth`" in card and "`kl_tiny.ckpt`" in card and "no tokenizer" not in card
    # Generate an image, then ask about it, as the card shows (the snippets name the folder as convert got it).
    monkeypatch.chdir(tmp_path)
    generation, answering = _python_snippets(harmon_folder)
    exec(generation, {})
    assert (tmp_path / "image.png").is_file()
    exec(answering, {})


def test_a_folder_converted_without_tokenizer_says_what_it_lacks(tmp_path):
    convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path / "bare")
    assert _metadata(tmp_path / "bare")["license_name"] == "s-lab-license-1.0"
    assert "no tokenizer (it was converted without `--tokenizer`)" in (tmp_path / "bare" / "README.md").read_text()


def test_a_release_config_makes_the_release_the_base_model(tmp_path):
    assert [release_name(name) for name in ("0.5b", "Harmon-1.5B", "harmon_1.5b-o", GOLDEN / "config.json")] == \
           ["0.5b", "1.5b", "1.5b-o", None]
    folder = tmp_path / "harmon-1.5b"
    folder.mkdir()
    card = conversion_card(folder, "harmon_1.5b.pth", "kl16.ckpt", "1.5b", "bfloat16", has_processor=True)
    card.save(folder / "README.md")
    assert _metadata(folder)["base_model"] == RELEASE_REPOSITORY
    assert card.text.lstrip().startswith("# Harmon-1.5B")
    # What is trained from the folder descends from the release, under its license.
    assert inherited_metadata(str(folder)) == {"base_model": RELEASE_REPOSITORY, **RELEASE_LICENSE}
    assert inherited_metadata("someone/harmon-finetune") == {"base_model": "someone/harmon-finetune"}
    sources = [{"path": "captions.parquet", "task": "text_to_image", "ratio": 1.0}]
    trained = training_card("run/final", make_recipe(folder, "run", sources), steps=10)
    assert trained.data.base_model == RELEASE_REPOSITORY
    # An adapter loads onto the folder, not onto the release's files: no base_model, the license kept.
    adapter = training_card("run/adapter", make_recipe(folder, "run", sources, lora={"r": 2}), steps=10)
    assert adapter.data.base_model is None and adapter.data.license_name == "s-lab-license-1.0"


def test_a_start_folder_without_a_usable_card_passes_nothing_on(tmp_path):
    assert inherited_metadata(str(tmp_path)) == {}  # no README.md
    (tmp_path / "README.md").write_text("---\n[not: a mapping\n---\n# A card\n")
    assert inherited_metadata(str(tmp_path)) == {}


def test_trained_folder_has_a_card_of_its_recipe(harmon_folder, captions, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", [{"path": str(captions), "task": "text_to_image", "ratio": 1.0}],
                         training={"max_steps": 2, "per_device_train_batch_size": 2})
    final = train(recipe)
    # The start folder is a conversion: the trained model keeps its license; it names no base_model to pass on.
    assert _metadata(final) == {"library_name": "transformers", "pipeline_tag": "any-to-any", "tags": TAGS,
                                **RELEASE_LICENSE}
    card = (final / "README.md").read_text()
    assert f"`harmon train` trained it from `{harmon_folder}`\nfor 2 steps" in card
    assert f"model: {harmon_folder}\n" in card and "max_steps: 2\n" in card  # the recipe as run


def test_lora_adapter_and_its_merged_export_have_cards(harmon_folder, captions, tmp_path):
    recipe = make_recipe(harmon_folder, tmp_path / "run", [{"path": str(captions), "task": "text_to_image", "ratio": 1.0}],
                         training={"max_steps": 1, "per_device_train_batch_size": 2},
                         learning_rates={"language_model": 1e-3},
                         lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    adapter = train(recipe)
    # Our card replaces peft's template: peft's library name, this project's tags, no local path as base_model.
    assert _metadata(adapter) == {"library_name": "peft", "pipeline_tag": "any-to-any", "tags": [*TAGS, "lora"],
                                  **RELEASE_LICENSE}
    assert f"--model {harmon_folder} --lora {adapter}" in (adapter / "README.md").read_text()
    export_merged(str(harmon_folder), adapter, tmp_path / "merged")
    assert _metadata(tmp_path / "merged") == {"library_name": "transformers", "pipeline_tag": "any-to-any",
                                              "tags": TAGS, **RELEASE_LICENSE}
    assert f"with the LoRA adapter `{adapter}` merged" in (tmp_path / "merged" / "README.md").read_text()
