"""Hub-native loading: Auto classes, remote code without harmon_hf installed, dtype and device_map."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import GOLDEN, WITHOUT_HARMON_HF
from harmon_hf import HarmonConfig, HarmonForConditionalGeneration


def test_auto_classes_give_the_full_model(tiny_folder):
    assert isinstance(AutoConfig.from_pretrained(tiny_folder), HarmonConfig)
    for auto_class in (AutoModel, AutoModelForCausalLM):
        assert type(auto_class.from_pretrained(tiny_folder)) is HarmonForConditionalGeneration


def test_saved_config_names_the_remote_code(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["model_type"] == "harmon"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_harmon.HarmonConfig",
        "AutoModel": "modeling_harmon.HarmonForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_harmon.HarmonForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_harmon.HarmonForConditionalGeneration",
        "AutoModelForMultimodalLM": "modeling_harmon.HarmonForConditionalGeneration",
    }


REMOTE_CODE_SCRIPT = WITHOUT_HARMON_HF + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    folder, vectors = sys.argv[1], load_file(sys.argv[2])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "HarmonForConditionalGeneration", type(model)
    assert "harmon_hf" not in sys.modules and not type(model).__module__.startswith("harmon_hf")
    with torch.no_grad():
        logits = model(input_ids=vectors["und.input_ids"], attention_mask=vectors["und.attention_mask"],
                       pixel_values=vectors["und.pixel_values"]).logits
        valid = vectors["und.attention_mask"].bool()
        print("logits error", (logits[valid] - vectors["und.logits"][valid]).abs().max().item())
        image = model.generate_images(vectors["gen.prompt_ids"], vectors["gen.prompt_mask"], num_iter=2,
                                      num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        print("image", tuple(image.shape))
    """
)


def test_remote_code_loads_without_harmon_hf(tiny_folder, tmp_path):
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_folder), str(GOLDEN / "vectors.safetensors")],
        capture_output=True, text=True, env=environment, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    error = float(result.stdout.split("logits error")[1].split()[0])
    assert error <= 1e-4
    assert "image (2, 3, 64, 64)" in result.stdout


def test_dtype_and_device_map(tiny_folder, golden):
    model = AutoModel.from_pretrained(tiny_folder, dtype=torch.bfloat16, device_map="auto")
    assert model.model.vae.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())  # materialised, none on meta
    assert AutoModel.from_pretrained(tiny_folder, torch_dtype=torch.float16).lm_head.weight.dtype == torch.float16
    with torch.no_grad():
        logits = model(input_ids=golden["und.input_ids"], attention_mask=golden["und.attention_mask"],
                       pixel_values=golden["und.pixel_values"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_save_pretrained_round_trip_keeps_tied_weights(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    reloaded = HarmonForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    for (name, expected), (_, actual) in zip(tiny_model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(expected, actual), name
