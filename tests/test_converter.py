"""The converter: every released tensor is mapped, any configuration of the reference schema converts, and a
checkpoint that does not fit is refused with a clear error before anything is written."""

import errno
import json
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN, REFERENCE, run_harmon
from harmon_hf import HarmonConfig
from harmon_hf.convert import (HARMON_RULES, build_model, convert, release_config, rename, resolve_config,
                               vae_rules)
from reference_layout import random_release, release_shapes, variant


QWEN_0_5B = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
}
MAR_B = {
    "img_size": 256, "encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12,
    "decoder_embed_dim": 768, "decoder_depth": 12, "decoder_num_heads": 12, "buffer_size": 64,
    "diffloss_d": 6, "diffloss_w": 1024, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16, "class_num": 1000,
}
KL16 = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "resolution": 256, "embed_dim": 16}
RELEASE_REFERENCE_CONFIGS = {
    "0.5b": {"llm": QWEN_0_5B, "mar": MAR_B, "vae": KL16, "vae_scale": 0.2325},
    "1.5b": {
        "llm": {**QWEN_0_5B, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
        "mar": {**MAR_B, "encoder_embed_dim": 1280, "encoder_depth": 20, "encoder_num_heads": 16,
                "decoder_embed_dim": 1280, "decoder_depth": 20, "decoder_num_heads": 16, "diffloss_d": 12, "diffloss_w": 1536},
        "vae": KL16,
        "vae_scale": 0.2325,
    },
}


def _meta_release(keys: dict) -> dict:
    return {name: torch.empty(shape, device="meta") for name, shape in keys.items()}


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_every_released_tensor_is_mapped(size):
    """All tensors of the real release files land in the model of the preset, with the right shapes."""
    keys = json.loads((REFERENCE / f"harmon-{size}-keys.json").read_text())
    config = release_config(size)
    harmon, unmatched = rename(_meta_release(keys["harmon"]), HARMON_RULES)
    vae, vae_unmatched = rename(_meta_release(keys["vae"]), vae_rules(len(config.vae_config["block_out_channels"])))
    assert unmatched == [] and vae_unmatched == []
    assert len(harmon) == len(keys["harmon"]) - 1  # only mar.class_emb is dropped
    harmon.pop("lm_head.weight")  # tied to the embeddings
    with torch.device("meta"):
        model = build_model({**harmon, **vae}, config)
    assert sum(p.numel() for p in model.parameters()) > 4e8


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_reference_layout_matches_the_release(size):
    """The test's own layout generator agrees with the real release's names and shapes."""
    keys = json.loads((REFERENCE / f"harmon-{size}-keys.json").read_text())
    harmon, vae = release_shapes(RELEASE_REFERENCE_CONFIGS[size])
    assert harmon == {name: tuple(shape) for name, shape in keys["harmon"].items()}
    assert vae == {name: tuple(shape) for name, shape in keys["vae"].items()}


def test_reference_configs_give_the_presets():
    for size, reference in RELEASE_REFERENCE_CONFIGS.items():
        converted, preset = resolve_config(reference), release_config(size)
        for field in ("encoder_hidden_size", "decoder_num_hidden_layers", "diffusion_head_hidden_size", "buffer_size"):
            assert getattr(converted, field) == getattr(preset, field)
        assert converted.vae_config == preset.vae_config
        assert converted.text_config.hidden_size == preset.text_config.hidden_size


VARIANTS = {
    "decoder_wider_than_encoder": {"mar__decoder_embed_dim": 48, "mar__decoder_num_heads": 3},
    "uneven_vae_multipliers": {"vae__ch_mult": [1, 2, 2, 1, 2]},
    "vae_attention_one_level_up": {"vae__attn_resolutions": [32]},
    "larger_base_grid": {"mar__img_size": 128},
    "wider_llm_and_head": {"llm__hidden_size": 96, "llm__num_attention_heads": 6, "mar__diffloss_w": 48, "mar__diffloss_d": 3},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_other_configurations_convert_and_run(tmp_path, golden_reference_config, name):
    reference = variant(golden_reference_config, **VARIANTS[name])
    harmon, vae = random_release(reference)
    model = convert(*_write_release(tmp_path, harmon, vae, reference))

    # Tensors arrive unchanged (1x1 attention convs as linears; LDM decoder levels reversed in diffusers).
    inner = model.model
    assert torch.equal(inner.mar_decoder.embed.weight, harmon["mar.decoder_embed.weight"])
    assert torch.equal(inner.diffusion_head.final_layer.modulation.bias, harmon["mar.diffloss.net.final_layer.adaLN_modulation.1.bias"])
    assert torch.equal(inner.vae.decoder.up_blocks[0].resnets[0].conv1.weight, vae["decoder.up.4.block.0.conv1.weight"])
    attention_level = [i for i, t in enumerate(inner.vae.config.down_block_types) if t.startswith("Attn")][0]
    assert torch.equal(
        inner.vae.encoder.down_blocks[attention_level].attentions[0].to_q.weight,
        vae[f"encoder.down.{attention_level}.attn.0.q.weight"][:, :, 0, 0],
    )

    # Understanding and a generation round run at a size other than the base grid.
    pixels = torch.rand(1, 3, 64, 96) * 2 - 1
    num_features = (64 // 16) * (96 // 16) + reference["mar"]["buffer_size"]
    input_ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, num_features), reference["image_token_id"]), torch.tensor([[7]])], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
        latents = model.generate_images(torch.tensor([[5, 6, 7], [5, 8, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                                        height=32, width=48, num_iter=2, num_inference_steps=3, output_type="latent")
    assert logits.shape == (1, input_ids.shape[1], reference["llm"]["vocab_size"]) and torch.isfinite(logits).all()
    assert latents.shape == (1, 2, 3, 16) and torch.isfinite(latents).all()


def _write_release(tmp_path, harmon, vae, reference):
    torch.save(harmon, tmp_path / "harmon.pth")
    torch.save({"model": vae}, tmp_path / "vae.ckpt")
    (tmp_path / "config.json").write_text(json.dumps(reference))
    return tmp_path / "harmon.pth", tmp_path / "vae.ckpt", tmp_path / "config.json"


def _drop_decoder_bias(harmon, vae, reference):
    del harmon["mar.decoder_blocks.1.mlp.fc2.bias"]
    return reference


def _add_unknown_vae_tensor(harmon, vae, reference):
    vae["encoder.extra_head.weight"] = torch.zeros(3)
    return reference


def _contradict_head_width(harmon, vae, reference):
    return variant(reference, mar__diffloss_w=96)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_drop_decoder_bias, r"missing tensor.*mar_decoder\.stack\.layers\.1\.mlp\.fc2\.bias"),
        (_add_unknown_vae_tensor, r"map to nothing.*encoder\.extra_head\.weight"),
        (_contradict_head_width, r"contradicts the checkpoint's shapes.*diffusion_head"),
    ],
)
def test_mismatched_release_is_refused_before_writing(tmp_path, golden_reference_config, corrupt, message):
    harmon, vae = random_release(golden_reference_config)
    reference = corrupt(harmon, vae, golden_reference_config)
    with pytest.raises(ValueError, match=message):
        convert(*_write_release(tmp_path, harmon, vae, reference), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inconsistent_reference_config_is_refused(golden_reference_config):
    with pytest.raises(ValueError, match="vae_stride"):
        resolve_config(variant(golden_reference_config, mar__vae_stride=8))
    with pytest.raises(ValueError, match="mar.patch_size must be 1 .* got 2"):
        resolve_config(variant(golden_reference_config, mar__patch_size=2))
    with pytest.raises(ValueError, match="no such file"):
        resolve_config("does-not-exist.json")


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harmon_hf.cli", "convert", "--checkpoint", str(tmp_path / "missing.pth"),
         "--vae", str(GOLDEN / "kl_tiny.ckpt"), "--config", str(GOLDEN / "config.json"), "--output", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr and "Traceback" not in result.stderr


class _NotATensor:
    """An object a release file must not hold: unpickling it could run code."""


def _nonfinite_checkpoint(tmp_path):
    """The golden tiny checkpoint with a NaN in one tensor and an inf in another."""
    state = torch.load(GOLDEN / "harmon_tiny.pth", weights_only=True)
    state["llm.model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    state["mar.decoder_embed.weight"][1] = float("inf")
    torch.save(state, tmp_path / "nonfinite.pth")
    return tmp_path / "nonfinite.pth"


def _convert_arguments(tmp_path, **overrides) -> list:
    """`harmon convert` of the golden tiny release into tmp_path/out, with some options changed."""
    options = {"checkpoint": GOLDEN / "harmon_tiny.pth", "vae": GOLDEN / "kl_tiny.ckpt",
               "config": GOLDEN / "config.json", "output": tmp_path / "out", **overrides}
    return ["convert", *(part for option, value in options.items() for part in (f"--{option}", value))]


def _existing_file_as_output(tmp_path):
    (tmp_path / "model").write_text("not a folder")
    return {"output": tmp_path / "model"}, r"--output .*model is a file: give a folder"


def _output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    return {"output": tmp_path / "file" / "model"}, r"cannot write .*file/model: .*file is not a writable folder"


def _nonfinite_tensors(tmp_path):
    return {"checkpoint": _nonfinite_checkpoint(tmp_path)}, (
        r"2 tensor\(s\) hold NaN or inf values \(.*nonfinite\.pth: llm\.model\.layers\.0\.mlp\.down_proj\.weight, "
        r"mar\.decoder_embed\.weight\); pass --allow-nonfinite"
    )


def _truncated_checkpoint(tmp_path):
    data = (GOLDEN / "harmon_tiny.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    return {"checkpoint": tmp_path / "truncated.pth"}, r"truncated\.pth is not a readable PyTorch checkpoint: \w"


def _vae_of_pickled_objects(tmp_path):
    torch.save({"model": {"encoder.conv_in.weight": _NotATensor()}}, tmp_path / "vae.ckpt")
    return {"vae": tmp_path / "vae.ckpt"}, r"vae\.ckpt holds objects other than tensors \(.*_NotATensor\).*for safety"


def _config_missing_a_key(tmp_path):
    reference = json.loads((GOLDEN / "config.json").read_text())
    del reference["mar"]["encoder_embed_dim"]
    (tmp_path / "config.json").write_text(json.dumps(reference))
    return {"config": tmp_path / "config.json"}, r"--config .*config\.json: missing key mar\.encoder_embed_dim$"


def _missing_tokenizer(tmp_path):
    return {"tokenizer": tmp_path / "no-tokenizer"}, r"cannot load the tokenizer .*no-tokenizer: \w"


def _files(folder) -> dict:
    return {path: path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.mark.parametrize(
    "bad_input",
    [_existing_file_as_output, _output_under_a_file, _nonfinite_tensors, _truncated_checkpoint,
     _vae_of_pickled_objects, _config_missing_a_key, _missing_tokenizer],
)
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, bad_input):
    overrides, message = bad_input(tmp_path)
    files_before = _files(tmp_path)
    result = run_harmon(*_convert_arguments(tmp_path, **overrides))
    assert result.returncode == 1 and "Saved" not in result.stdout
    assert result.stderr.startswith("harmon convert: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    assert re.search(message, result.stderr.strip()), result.stderr
    assert _files(tmp_path) == files_before  # nothing written, an existing file untouched


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], r"harmon\.pth holds a list, not a state dict"),
        (torch.zeros(3), r"harmon\.pth holds a Tensor, not a state dict"),
        ({"llm.lm_head.weight": torch.zeros(3), "epoch": 3, "optimizer": {}},
         r"harmon\.pth is not a state dict: 2 entry\(ies\) are not tensors by name: "
         r"'epoch' \(int\), 'optimizer' \(dict\)$"),
    ],
)
def test_release_file_that_is_not_a_state_dict_is_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "harmon.pth")
    with pytest.raises(ValueError, match=message):
        convert(tmp_path / "harmon.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")


def test_nonfinite_tensors_are_refused_by_their_names_in_the_release(tmp_path):
    vae = torch.load(GOLDEN / "kl_tiny.ckpt", weights_only=True)
    vae["model"]["decoder.conv_out.bias"][0] = float("-inf")
    torch.save(vae, tmp_path / "vae.ckpt")
    message = r"^1 tensor\(s\) hold NaN or inf values \(.*vae\.ckpt: decoder\.conv_out\.bias\); pass --allow-nonfinite"
    with pytest.raises(ValueError, match=message):
        convert(GOLDEN / "harmon_tiny.pth", tmp_path / "vae.ckpt", GOLDEN / "config.json")

    # All NaN: named as such, not reported as an lm_head that differs from the embeddings (NaN != NaN).
    state = torch.load(GOLDEN / "harmon_tiny.pth", weights_only=True)
    torch.save({name: torch.full_like(tensor, float("nan")) for name, tensor in state.items()}, tmp_path / "nan.pth")
    message = rf"^{len(state)} tensor\(s\) hold NaN or inf values \(.*nan\.pth: llm\.model\.embed_tokens\.weight, "
    with pytest.raises(ValueError, match=message) as error:
        convert(tmp_path / "nan.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    assert "differs" not in str(error.value)
    model = convert(tmp_path / "nan.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", allow_nonfinite=True)
    assert model.lm_head.weight.isnan().all()


def test_allow_nonfinite_converts_anyway(tmp_path):
    from harmon_hf.cli import main

    assert main([*map(str, _convert_arguments(tmp_path, checkpoint=_nonfinite_checkpoint(tmp_path))),
                 "--allow-nonfinite"]) == 0
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["model.language_model.layers.0.mlp.down_proj.weight"][0, 0].isnan()
    assert weights["model.mar_decoder.embed.weight"][1].isinf().all()


@pytest.mark.parametrize(
    "text, message",
    [
        (lambda reference: "{not json", " is not a readable JSON file: Expecting property name"),
        (lambda reference: "[1, 2]", ": the config must be a JSON object, got list$"),
        (lambda reference: json.dumps({**reference, "vae": 16}), ": vae must be a JSON object, got int$"),
        (lambda reference: json.dumps({key: value for key, value in reference.items() if key != "vae_scale"}),
         ": missing key vae_scale$"),
    ],
)
def test_bad_config_file_is_named_in_the_error(tmp_path, golden_reference_config, text, message):
    path = tmp_path / "config.json"
    path.write_text(text(golden_reference_config))
    with pytest.raises(ValueError, match=f"^--config {re.escape(str(path))}{message}"):
        resolve_config(path)


def test_failure_to_write_the_folder_names_it(tmp_path, monkeypatch):
    from harmon_hf import HarmonForConditionalGeneration

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HarmonForConditionalGeneration, "save_pretrained", disk_full)
    message = (f"^cannot write {re.escape(str(tmp_path / 'out'))}: the disk is full or a file size limit was reached "
               r"\(No space left on device\)$")
    with pytest.raises(ValueError, match=message):
        convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no folder, no partial one beside it


def test_converted_folder_is_safetensors_and_bfloat16_on_request(tmp_path):
    convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path, dtype="bfloat16")
    files = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pth", ".pt")) for name in files)
    assert {"modeling_harmon.py", "configuration_harmon.py", "scheduling_harmon.py"} <= files
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.mar_encoder.pos_embed").dtype == torch.bfloat16


def _tiny_tokenizer_folder(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def test_tokenizer_gets_the_image_token_and_is_saved(tmp_path):
    from transformers import AutoTokenizer

    tokenizer_folder = _tiny_tokenizer_folder(tmp_path / "tokenizer", 511)  # <image> becomes 511, as in golden
    from harmon_hf.cli import main

    assert main(["convert", "--checkpoint", str(GOLDEN / "harmon_tiny.pth"), "--vae", str(GOLDEN / "kl_tiny.ckpt"),
                 "--config", str(GOLDEN / "config.json"), "--tokenizer", str(tokenizer_folder),
                 "--output", str(tmp_path / "out")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.encode("w5 <image> w7", add_special_tokens=False) == [5, 511, 7]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_token_id"] == 511


def test_image_token_beyond_the_embeddings_is_refused(tmp_path):
    tokenizer_folder = _tiny_tokenizer_folder(tmp_path / "tokenizer", 600)
    with pytest.raises(ValueError, match="<image> got id 600, beyond the LLM's 512 embeddings"):
        convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json",
                output=tmp_path / "out", tokenizer=str(tokenizer_folder))
    assert not (tmp_path / "out").exists()


def test_qwen2_5_image_token_id():
    """With the real Qwen2.5 vocabulary, <image> lands right after the 22 special tokens, as in the release."""
    from harmon_hf.convert import add_image_token
    from offline_qwen import qwen2_5_tokenizer

    tokenizer = qwen2_5_tokenizer()
    config = release_config("0.5b", image_token_id=0)
    add_image_token(tokenizer, config)
    assert config.image_token_id == 151665 == HarmonConfig().image_token_id
    assert tokenizer.encode("Hello <image>", add_special_tokens=False) == [9707, 220, 151665]


def test_large_conversions_are_sharded(tmp_path):
    from harmon_hf import HarmonForConditionalGeneration

    model = convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path,
                    max_shard_size="1MB")
    shards = sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").is_file()
    reloaded = HarmonForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


# -- checkpoints that training writes -----------------------------------------------------------------------------


class HistoryBuffer:
    """Stands for mmengine's logged-scalar buffer, which its checkpoints pickle beside the weights (with numpy)."""

    def __init__(self, values):
        self._log_history = np.asarray(values)
        self._count_history = np.ones(len(values))


def _mmengine_checkpoint(path, monkeypatch, state_dict: dict, wrapped: bool):
    """An `iter_N.pth` as mmengine/xtuner's CheckpointHook writes it: the weights under "state_dict" beside the run's
    bookkeeping, or (as RecA's scripts re-save it) the weights alone."""
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):  # where pickle looks it up
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    monkeypatch.setattr(HistoryBuffer, "__module__", "mmengine.logging.history_buffer")
    content = state_dict
    if wrapped:
        content = {"meta": {"iter": 5000, "mmengine_version": "0.10.7", "seed": np.int64(42)},
                   "state_dict": state_dict,
                   "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([0.5, 0.4])}, "runtime_info": {}},
                   "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}}
    torch.save(content, path)
    return path


def _logits(model) -> torch.Tensor:
    input_ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict-wrapper", "bare"])
def test_mmengine_checkpoints_convert_to_the_release_conversion(tmp_path, monkeypatch, wrapped):
    release = torch.load(GOLDEN / "harmon_tiny.pth", weights_only=True)
    assert not any(name.startswith("vae.") for name in release)  # the VAE comes from --vae, as with the release
    path = _mmengine_checkpoint(tmp_path / "iter_5000.pth", monkeypatch, release, wrapped)
    if wrapped:
        assert any(name.startswith("mmengine.") for name in torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with pytest.raises(pickle.UnpicklingError):  # what weights_only alone says of such a file
            torch.load(path, weights_only=True)
    expected = convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    actual = convert(path, GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    torch.testing.assert_close(_logits(actual), _logits(expected), rtol=0, atol=0)
    assert all(torch.equal(tensor, actual.state_dict()[name]) for name, tensor in expected.state_dict().items())


def test_a_checkpoint_carrying_the_frozen_vae_converts_with_the_vae_file(tmp_path):
    release = torch.load(GOLDEN / "harmon_tiny.pth", weights_only=True)
    vae = torch.load(GOLDEN / "kl_tiny.ckpt", weights_only=True)["model"]
    torch.save({**release, **{f"vae.{name}": tensor for name, tensor in vae.items()}}, tmp_path / "with_vae.pth")
    expected = convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    actual = convert(tmp_path / "with_vae.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    torch.testing.assert_close(_logits(actual), _logits(expected), rtol=0, atol=0)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_consolidated_deepspeed_safetensors_convert(tmp_path, sharded):
    """DeepSpeed's `zero_to_fp32 --safe_serialization` output: model.safetensors, or shards with their index."""
    from huggingface_hub import save_torch_state_dict

    release = torch.load(GOLDEN / "harmon_tiny.pth", weights_only=True)
    (tmp_path / "consolidated").mkdir()
    save_torch_state_dict(release, tmp_path / "consolidated", max_shard_size="20KB" if sharded else "10GB")
    assert (tmp_path / "consolidated" / "model.safetensors.index.json").is_file() == sharded
    expected = convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    actual = convert(tmp_path / "consolidated", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
    torch.testing.assert_close(_logits(actual), _logits(expected), rtol=0, atol=0)


def test_a_deepspeed_folder_is_refused_with_the_consolidation_command(tmp_path):
    folder = tmp_path / "work_dirs" / "iter_5000.pth"
    folder.mkdir(parents=True)
    torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
    result = run_harmon(*_convert_arguments(tmp_path, checkpoint=folder))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert (f"is a DeepSpeed checkpoint folder: consolidate it with DeepSpeed first, `python -m "
            f"deepspeed.utils.zero_to_fp32 {folder.parent} OUT --tag iter_5000.pth --safe_serialization`") in result.stderr


def test_unknown_objects_in_a_training_checkpoint_are_refused_by_name(tmp_path):
    release = torch.load(GOLDEN / "harmon_tiny.pth", weights_only=True)
    torch.save({"state_dict": release, "hook": _NotATensor()}, tmp_path / "iter_10.pth")
    with pytest.raises(ValueError, match=r"iter_10\.pth holds objects other than tensors \(test_converter\._NotATensor\)"):
        convert(tmp_path / "iter_10.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json")
