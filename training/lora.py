"""LoRA adapters trained by `harmon train` with a `lora:` section: load onto a base model, merge, export."""

from pathlib import Path


def load_with_adapter(base_model, adapter: "str | Path"):
    """The base model with the adapter merged into its weights: a plain HarmonForConditionalGeneration."""
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ValueError("LoRA adapters need peft: pip install 'harmon-hf[train]'") from error
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"no LoRA adapter in {adapter} (adapter_config.json is missing)")
    return PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()


def export_merged(base: str, adapter: "str | Path", output: "str | Path"):
    """Save base + adapter, merged, as a normal model folder (model, processor, remote code)."""
    from transformers import AutoProcessor

    from harmon_hf import HarmonForConditionalGeneration
    from harmon_hf.model_card import CARD_FILE, merged_card

    merged = load_with_adapter(HarmonForConditionalGeneration.from_pretrained(base), adapter)
    merged.save_pretrained(output)
    AutoProcessor.from_pretrained(base).save_pretrained(output)
    merged_card(output, base, adapter).save(Path(output) / CARD_FILE)
    return merged
