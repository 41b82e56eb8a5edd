"""Convert the released Harmon files (`harmon_*.pth` + `kl16.ckpt`) into a transformers model folder.

The same path reads what Harmon's fine-tuning produces elsewhere: mmengine/xtuner `iter_N.pth` checkpoints (as the
reference's own training and RecA's write them), DeepSpeed checkpoints once consolidated to safetensors, and
safetensors files of the release's names.

Every tensor of the release is mapped by an explicit renaming rule; a tensor no rule maps, a tensor the model lacks,
a shape the configuration contradicts or (unless allowed) a NaN or inf stops the conversion before anything is written.
"""

import json
import os
import pickle
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights

from .model_card import CARD_FILE, conversion_card
from .user_input import cannot_write, first_line, system_error, unwritable_folder
from .modeling import HarmonConfig, HarmonForConditionalGeneration, HarmonImageProcessor, HarmonProcessor
from .modeling.configuration_harmon import QWEN2_5_0_5B_INSTRUCT
from .modeling.modeling_harmon import nonfinite_tensors


IMAGE_TOKEN = "<image>"
# Shards of at most this size keep every file of the 1.5B model in float32 small enough for ordinary uploads.
MAX_SHARD_SIZE = "2GB"


def processor_for(config: HarmonConfig, tokenizer) -> HarmonProcessor:
    """The processor matching a model's configuration, around a tokenizer that knows `<image>`."""
    image_processor = HarmonImageProcessor(image_size=config.image_size, vae_stride=config.vae_stride)
    return HarmonProcessor(image_processor=image_processor, tokenizer=tokenizer, num_buffer_tokens=config.buffer_size)


# (pattern, replacement) on the names of harmon_*.pth, tried in order; `None` drops the tensor.
HARMON_RULES = [
    (r"^llm\.model\.", "model.language_model."),
    (r"^llm\.lm_head\.", "lm_head."),
    (r"^mar\.class_emb\.weight$", None),  # MAR's ImageNet class embedding: Harmon always uses fake_latent
    # Training checkpoints may carry the VAE; it is frozen in all of Harmon's training, so --vae holds the same weights.
    (r"^vae\.", None),
    (r"^mar\.fake_latent$", "model.mar_encoder.buffer_embedding"),
    (r"^mar\.encoder_pos_embed_learned$", "model.mar_encoder.pos_embed"),
    (r"^mar\.z_proj\.", "model.mar_encoder.token_proj."),
    (r"^mar\.z_proj_ln\.", "model.mar_encoder.token_norm."),
    (r"^mar\.encoder_blocks\.", "model.mar_encoder.stack.layers."),
    (r"^mar\.encoder_norm\.", "model.mar_encoder.stack.norm."),
    (r"^mar\.decoder_embed\.", "model.mar_decoder.embed."),
    (r"^mar\.mask_token$", "model.mar_decoder.mask_token"),
    (r"^mar\.decoder_pos_embed_learned$", "model.mar_decoder.pos_embed"),
    (r"^mar\.decoder_blocks\.", "model.mar_decoder.stack.layers."),
    (r"^mar\.decoder_norm\.", "model.mar_decoder.stack.norm."),
    (r"^mar\.diffusion_pos_embed_learned$", "model.mar_decoder.diffusion_pos_embed"),
    (r"^mar\.diffloss\.net\.time_embed\.mlp\.0\.", "model.diffusion_head.time_embed.linear_1."),
    (r"^mar\.diffloss\.net\.time_embed\.mlp\.2\.", "model.diffusion_head.time_embed.linear_2."),
    (r"^mar\.diffloss\.net\.(res_blocks\.\d+)\.in_ln\.", r"model.diffusion_head.\1.norm."),
    (r"^mar\.diffloss\.net\.(res_blocks\.\d+)\.mlp\.0\.", r"model.diffusion_head.\1.fc1."),
    (r"^mar\.diffloss\.net\.(res_blocks\.\d+)\.mlp\.2\.", r"model.diffusion_head.\1.fc2."),
    (r"^mar\.diffloss\.net\.(res_blocks\.\d+|final_layer)\.adaLN_modulation\.1\.", r"model.diffusion_head.\1.modulation."),
    (r"^mar\.diffloss\.net\.(final_layer\.linear|cond_embed|input_proj)\.", r"model.diffusion_head.\1."),
    (r"^(proj_in|proj_out)\.0\.", r"model.\1.linear_1."),
    (r"^(proj_in|proj_out)\.2\.", r"model.\1.linear_2."),
]

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_rules(num_levels: int) -> list[tuple[str, str]]:
    """Renaming of the LDM KL autoencoder's names to diffusers' `AutoencoderKL` (decoder levels are reversed)."""
    rules = [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^(encoder|decoder)\.(conv_in|conv_out)\.", r"\1.\2."),
        (r"^(quant_conv|post_quant_conv)\.", r"\1."),
        (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    ]
    resnets = [
        (r"^(encoder|decoder)\.mid\.block_1", r"\1.mid_block.resnets.0"),
        (r"^(encoder|decoder)\.mid\.block_2", r"\1.mid_block.resnets.1"),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)", r"encoder.down_blocks.\1.resnets.\2"),
    ]
    attentions = [
        (r"^(encoder|decoder)\.mid\.attn_1", r"\1.mid_block.attentions.0"),
        (r"^encoder\.down\.(\d+)\.attn\.(\d+)", r"encoder.down_blocks.\1.attentions.\2"),
    ]
    for level in range(num_levels):
        up = num_levels - 1 - level
        resnets.append((rf"^decoder\.up\.{level}\.block\.(\d+)", rf"decoder.up_blocks.{up}.resnets.\1"))
        rules.append((rf"^decoder\.up\.{level}\.upsample\.conv\.", rf"decoder.up_blocks.{up}.upsamplers.0.conv."))
    for prefixes, parts in ((resnets, _RESNET_PARTS), (attentions, _ATTENTION_PARTS)):
        for (ldm_prefix, diffusers_prefix) in prefixes:
            for ldm_part, diffusers_part in parts.items():
                rules.append((rf"{ldm_prefix}\.{ldm_part}\.", rf"{diffusers_prefix}.{diffusers_part}."))
    return [(pattern, "model.vae." + replacement) for pattern, replacement in rules]


def rename(state_dict: dict, rules: list) -> tuple[dict, list[str]]:
    """Apply the first matching rule to every name; returns the renamed tensors and the names no rule matched."""
    renamed, unmatched = {}, []
    for name, tensor in state_dict.items():
        for pattern, replacement in rules:
            if re.search(pattern, name):
                if replacement is not None:
                    renamed[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            unmatched.append(name)
    return renamed, unmatched


class _Section(dict):
    """An object of the reference schema whose missing keys raise ValueError with their dotted name."""

    def __init__(self, values, path: tuple = ()):
        if not isinstance(values, dict):
            raise ValueError(f"{'.'.join(path) or 'the config'} must be a JSON object, got {type(values).__name__}")
        super().__init__(values)
        self.path = path

    def __missing__(self, key):
        raise ValueError(f"missing key {'.'.join((*self.path, key))}")

    def section(self, key: str) -> "_Section":
        return _Section(self[key], (*self.path, key))


def config_from_reference(reference: dict) -> HarmonConfig:
    """A `HarmonConfig` from the reference's constructor arguments (the schema of golden/config.json)."""
    reference = _Section(reference)
    llm, mar, vae = reference.section("llm"), reference.section("mar"), reference.section("vae")
    num_levels = len(vae["ch_mult"])
    vae_stride = 2 ** (num_levels - 1)
    if mar.get("patch_size", 1) != 1:
        raise ValueError(f"mar.patch_size must be 1 (Harmon uses one latent per token), got {mar['patch_size']}")
    if mar["vae_stride"] != vae_stride:
        raise ValueError(f"mar.vae_stride is {mar['vae_stride']} but a VAE with {num_levels} levels has stride {vae_stride}")
    if mar["vae_embed_dim"] != vae["embed_dim"]:
        raise ValueError(f"mar.vae_embed_dim ({mar['vae_embed_dim']}) must equal vae.embed_dim ({vae['embed_dim']})")
    if mar["img_size"] % vae_stride:
        raise ValueError(f"mar.img_size ({mar['img_size']}) must be a multiple of the VAE stride ({vae_stride})")
    level_resolutions = [vae["resolution"] // 2**level for level in range(num_levels)]
    vae_config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": [
            "AttnDownEncoderBlock2D" if resolution in vae["attn_resolutions"] else "DownEncoderBlock2D"
            for resolution in level_resolutions
        ],
        "up_block_types": ["UpDecoderBlock2D"] * num_levels,
        "block_out_channels": [vae["ch"] * multiplier for multiplier in vae["ch_mult"]],
        "layers_per_block": vae["num_res_blocks"],
        "latent_channels": vae["embed_dim"],
        "norm_num_groups": 32,
        "sample_size": vae["resolution"],
        "act_fn": "silu",
    }
    text_config = {"model_type": "qwen2", **llm}
    if reference.get("pad_token_id") is not None:
        text_config["pad_token_id"] = reference["pad_token_id"]
    return HarmonConfig(
        text_config=text_config,
        vae_config=vae_config,
        vae_scale=reference["vae_scale"],
        encoder_hidden_size=mar["encoder_embed_dim"],
        encoder_num_hidden_layers=mar["encoder_depth"],
        encoder_num_attention_heads=mar["encoder_num_heads"],
        decoder_hidden_size=mar["decoder_embed_dim"],
        decoder_num_hidden_layers=mar["decoder_depth"],
        decoder_num_attention_heads=mar["decoder_num_heads"],
        mlp_ratio=mar.get("mlp_ratio", 4.0),
        layer_norm_eps=mar.get("norm_eps", 1e-6),
        attention_dropout=mar.get("attn_dropout", 0.1),
        hidden_dropout=mar.get("proj_dropout", 0.1),
        buffer_size=mar["buffer_size"],
        base_grid_size=mar["img_size"] // vae_stride,
        diffusion_head_hidden_size=mar["diffloss_w"],
        diffusion_head_num_layers=mar["diffloss_d"],
        num_inference_steps=int(mar.get("num_sampling_steps", 100)),
        diffusion_batch_mul=mar.get("diffusion_batch_mul", 4),
        mask_ratio_min=mar.get("mask_ratio_min", 0.7),
        image_size=reference.get("image_size", 512),
        image_token_id=reference.get("image_token_id", HarmonConfig().image_token_id),
    )


# Keyword arguments of `HarmonConfig` for the released checkpoints (wusize/harmon); Harmon-1.5B-O shares 1.5b's.
RELEASES = {
    "0.5b": {},  # the defaults of HarmonConfig
    "1.5b": {
        "text_config": {
            **QWEN2_5_0_5B_INSTRUCT,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
        },
        "encoder_hidden_size": 1280,
        "encoder_num_hidden_layers": 20,
        "encoder_num_attention_heads": 16,
        "decoder_hidden_size": 1280,
        "decoder_num_hidden_layers": 20,
        "decoder_num_attention_heads": 16,
        "diffusion_head_hidden_size": 1536,
        "diffusion_head_num_layers": 12,
    },
}


def release_name(config: "str | Path | dict | HarmonConfig") -> str | None:
    """The release a `--config` names, as "0.5b", "1.5b" or "1.5b-o" ("Harmon-1.5B" too), else None."""
    name = str(config).lower().removeprefix("harmon-").removeprefix("harmon_")
    return name if name in {"0.5b", "1.5b", "1.5b-o"} else None


def release_config(name: str, **overrides) -> HarmonConfig:
    """The configuration of a released checkpoint, `"0.5b"` or `"1.5b"` (`"1.5b-o"` and "Harmon-1.5B" too), with
    `overrides` (HarmonConfig's keyword arguments) on top."""
    release = release_name(name)
    if release is None:
        raise ValueError(f"Unknown Harmon release {name!r}; expected one of {sorted(RELEASES)}")
    return HarmonConfig(**{**RELEASES[release.removesuffix("-o")], **overrides})


def resolve_config(config: "str | Path | dict | HarmonConfig") -> HarmonConfig:
    """`"0.5b"`/`"1.5b"`, a JSON file of the reference schema, its parsed dict, or a `HarmonConfig`."""
    if isinstance(config, HarmonConfig):
        return config
    if isinstance(config, dict):
        return config_from_reference(config)
    if release_name(config) is not None:
        return release_config(str(config))
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"--config must be 0.5b, 1.5b or a JSON file, got {str(config)!r} (no such file)")
    try:
        reference = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"--config {path} is not a readable JSON file: {error}") from error
    try:
        return config_from_reference(reference)
    except ValueError as error:
        raise ValueError(f"--config {path}: {error}") from error


# Training checkpoints keep, beside the weights, the bookkeeping of the framework that wrote them: mmengine/xtuner's
# `iter_N.pth` holds its logged scalars (mmengine HistoryBuffers of numpy arrays) and run metadata. While such a file is
# read weights-only, the classes of these packages are stood in for by `_Inert`, so the file's weights load without
# running any of its code; a class of any other package is refused by name.
BOOKKEEPING_PACKAGES = ("mmengine", "xtuner", "numpy")
# Where a training checkpoint keeps the model's tensors: mmengine under "state_dict", an LDM checkpoint under "model".
STATE_DICT_KEYS = ("state_dict", "model")


class _Inert:
    """Stands in for a bookkeeping object while a checkpoint is read: built from anything, it keeps and runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_weights_only(path: "str | Path"):
    """`torch.load(weights_only=True)`, with the classes of BOOKKEEPING_PACKAGES read as `_Inert`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    others = [name for name in names if name.split(".")[0] not in BOOKKEEPING_PACKAGES]
    if others:
        # torch's message advises weights_only=False, which would run whatever code the file holds: never an option.
        raise ValueError(f"{path} holds objects other than tensors ({others[0]}), or is damaged; "
                         "it is not loaded, for safety") from None
    with torch.serialization.safe_globals([(_Inert, name) for name in names]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_safetensors_checkpoint(folder: Path) -> dict:
    """The tensors of a folder of safetensors files (one `model.safetensors`, or shards with their index), as
    DeepSpeed's `zero_to_fp32 --safe_serialization` writes a consolidated checkpoint."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def check_checkpoint_path(path: Path):
    """Refuse a checkpoint path that is neither a file nor a folder of safetensors, saying what to do with a DeepSpeed
    checkpoint folder (its files are pickles of whole objects, which are never unpickled here)."""
    if path.is_file():
        return
    if not path.is_dir():
        raise ValueError(f"no such file: {path}")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        if list(path.glob("*model_states.pt")):
            raise ValueError(
                f"{path} is a DeepSpeed checkpoint folder: consolidate it with DeepSpeed first, "
                f"`python -m deepspeed.utils.zero_to_fp32 {path.parent} OUT --tag {path.name} --safe_serialization`, "
                "then give --checkpoint OUT")
        raise ValueError(f"{path} is a folder without model.safetensors or model.safetensors.index.json")


def load_release_file(path: "str | Path") -> dict:
    """The tensors of a checkpoint by name, loaded weights only: a release file, a training checkpoint holding them
    under one of STATE_DICT_KEYS (with its bookkeeping ignored), a `.safetensors` file, or a folder of them.

    Raises ValueError naming the file when it cannot be read, holds anything but tensors, or is not a state dict.
    """
    path = Path(path)
    try:
        if path.is_dir():
            loaded = load_safetensors_checkpoint(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(path)
        else:
            loaded = _load_weights_only(path)
    except ValueError:
        raise
    except Exception as error:  # a damaged file surfaces as RuntimeError, EOFError, KeyError...: all are the file's
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {first_line(error)}") from error
    if isinstance(loaded, dict):
        wrapper = next((key for key in STATE_DICT_KEYS if isinstance(loaded.get(key), dict)), None)
        loaded = loaded[wrapper] if wrapper else loaded
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (tensors by name)")
    others = [f"{name!r} ({type(value).__name__})" for name, value in loaded.items()
              if not (isinstance(name, str) and isinstance(value, torch.Tensor))]
    if others:
        raise ValueError(f"{path} is not a state dict: {len(others)} entry(ies) are not tensors by name: "
                         f"{', '.join(others[:10])}")
    return loaded


def load_release_state_dict(
    checkpoint: "str | Path", vae: "str | Path", config: HarmonConfig, allow_nonfinite: bool = False
) -> dict:
    """Both release files, renamed to this model's names; raises ValueError on any tensor left unmapped and, unless
    `allow_nonfinite`, on any tensor holding NaN or inf."""
    harmon_state, vae_state = load_release_file(checkpoint), load_release_file(vae)
    if not allow_nonfinite:
        # Named as in the user's files, so that they can be found there.
        nonfinite = [
            (path, nonfinite_tensors(tensors.items()))
            for path, tensors in ((checkpoint, harmon_state), (vae, vae_state))
        ]
        count = sum(len(names) for _, names in nonfinite)
        if count:
            listing = "; ".join(f"{path}: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
                                for path, names in nonfinite if names)
            raise ValueError(f"{count} tensor(s) hold NaN or inf values ({listing}); "
                             "pass --allow-nonfinite to convert anyway")
    state_dict, unknown = rename(harmon_state, HARMON_RULES)
    vae_renamed, vae_unknown = rename(vae_state, vae_rules(len(config.vae_config["block_out_channels"])))
    state_dict.update(vae_renamed)
    unknown = [f"{checkpoint}: {name}" for name in unknown] + [f"{vae}: {name}" for name in vae_unknown]
    if unknown:
        raise ValueError(f"{len(unknown)} tensor(s) of the release map to nothing in Harmon: {', '.join(unknown[:10])}")
    return state_dict


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`torch.equal`, but NaN equals NaN: a tied head holding the embeddings' NaNs (see `allow_nonfinite`) is theirs."""
    if torch.equal(a, b):
        return True
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def build_model(state_dict: dict, config: HarmonConfig) -> HarmonForConditionalGeneration:
    """The model holding exactly `state_dict`; raises ValueError on any missing tensor or contradicting shape."""
    with init_empty_weights():
        model = HarmonForConditionalGeneration(config)
    expected = model.state_dict()
    tied_head = "lm_head.weight"
    if config.tie_word_embeddings and tied_head in state_dict:
        embedding = state_dict["model.language_model.embed_tokens.weight"]
        if not _same_values(state_dict.pop(tied_head), embedding):
            raise ValueError("The config ties the LM head to the embeddings, but the checkpoint's lm_head differs")
    # A 1x1 attention conv of the LDM VAE is a linear layer in diffusers.
    for name, tensor in state_dict.items():
        if name.startswith("model.vae.") and tensor.ndim == 4 and expected.get(name) is not None:
            if expected[name].ndim == 2:
                state_dict[name] = tensor[:, :, 0, 0]
    missing = sorted(set(expected) - set(state_dict) - ({tied_head} if config.tie_word_embeddings else set()))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The release does not match the configuration: {len(missing)} missing tensor(s) {missing[:10]}, "
            f"{len(unexpected)} unknown tensor(s) {unexpected[:10]}"
        )
    mismatched = [
        f"{name}: checkpoint {tuple(tensor.shape)} vs config {tuple(expected[name].shape)}"
        for name, tensor in state_dict.items()
        if tensor.shape != expected[name].shape
    ]
    if mismatched:
        raise ValueError(f"The configuration contradicts the checkpoint's shapes: {'; '.join(mismatched[:10])}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def add_image_token(tokenizer, config: HarmonConfig):
    """Add `<image>` as a special token (as the reference does) and record its id in the config."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if config.image_token_id >= config.text_config.vocab_size:
        raise ValueError(
            f"<image> got id {config.image_token_id}, beyond the LLM's {config.text_config.vocab_size} embeddings"
        )
    return tokenizer


def check_output_folder(output: Path):
    """Refuse a model folder that cannot be written, before the work of the conversion (transformers only logs an
    error for a file and saves nothing)."""
    try:
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output {output} is a file: give a folder")
        blocker = unwritable_folder(output)
    except OSError as error:  # a folder on the way that may not be searched
        raise ValueError(f"cannot write {output}: {error.strerror or error}") from error
    if blocker is not None:
        raise ValueError(f"cannot write {output}: {blocker} is not a writable folder")


def convert(
    checkpoint: "str | Path",
    vae: "str | Path",
    config: "str | Path | dict | HarmonConfig",
    output: "str | Path | None" = None,
    tokenizer: "str | None" = None,
    dtype: str = "float32",
    max_shard_size: "int | str" = MAX_SHARD_SIZE,
    allow_nonfinite: bool = False,
) -> HarmonForConditionalGeneration:
    """Convert a release checkpoint and VAE; with `output`, save the model (safetensors) and tokenizer there.

    Tensors holding NaN or inf are refused unless `allow_nonfinite`. The folder's README.md is its model card.
    """
    release = release_name(config)
    config = resolve_config(config)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    check_checkpoint_path(Path(checkpoint))
    if not Path(vae).is_file():
        raise ValueError(f"no such file: {vae}")
    if output is not None:
        output = Path(output)
        check_output_folder(output)
    loaded_tokenizer = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as error:  # any failure to resolve or read a tokenizer is the user's tokenizer argument
            raise ValueError(f"cannot load the tokenizer {tokenizer}: {first_line(error)}") from error
        add_image_token(loaded_tokenizer, config)
    model = build_model(load_release_state_dict(checkpoint, vae, config, allow_nonfinite), config)
    model = model.to(getattr(torch, dtype))
    processor = None if loaded_tokenizer is None else processor_for(config, loaded_tokenizer)
    if processor is not None:  # `generate` ends an answer at the end of the turn, or of the text
        model.generation_config.eos_token_id = processor.end_token_ids
    if output is not None:
        card = conversion_card(output, checkpoint, vae, release, dtype, processor is not None)

        def save(folder: Path):
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            if processor is not None:
                processor.save_pretrained(folder)
            card.save(folder / CARD_FILE)

        write_folder(output, save)
    return model


# The weight files that `save_pretrained` writes: one file, or shards and their index.
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def write_folder(output: Path, save):
    """Call `save(folder)` on a new folder, then put what it wrote in place: the folder itself where `output` does not
    exist yet, else its files, which replace an earlier save's (whose weight files all go). A save that fails (a full
    disk, a file size limit) leaves nothing that a loader could take for a model; a ValueError says why."""
    new = not os.path.lexists(output)
    try:
        if new:
            output.parent.mkdir(parents=True, exist_ok=True)
        # beside a new folder, inside an existing one: where the checks found it writable, on its file system
        staging = Path(tempfile.mkdtemp(dir=output.parent if new else output, prefix=f".{output.name}.",
                                        suffix=".partial"))
    except OSError as error:
        raise ValueError(cannot_write(output, error)) from error
    try:
        built = staging / output.name
        built.mkdir()  # as a plain mkdir, with the umask's mode: mkdtemp's folder is 0700, for this user alone
        save(built)
        _give_plain_modes(built)
        if new:
            os.replace(built, output)
        else:
            _move_files(built, output)
    except Exception as error:
        cause = system_error(error)  # safetensors and tokenizers raise errors of their own for the system's
        if cause is None:
            raise
        raise ValueError(cannot_write(output, cause)) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _give_plain_modes(folder: Path):
    """Give the files in `folder` the mode that open() gives (0666 less the umask; safetensors writes its files 0600,
    which other users cannot read): the mode of the folder, made by a plain mkdir (0777 less the umask), less its x."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for file in folder.iterdir():
        file.chmod(mode)


def _move_files(built: Path, output: Path):
    """Move the files of `built` into the folder `output`, after removing the weight files of an earlier save (a single
    file would be loaded instead of new shards), config.json last: a move cut short leaves no loadable mix."""
    for stale in output.iterdir():
        if WEIGHT_FILE.fullmatch(stale.name):
            stale.unlink()
    for file in sorted(built.iterdir(), key=lambda file: file.name == "config.json"):
        os.replace(file, output / file.name)
