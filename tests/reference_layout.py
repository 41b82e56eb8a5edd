"""Tensor names and shapes of the reference's release files for any configuration of golden/config.json's schema.

Written from the reference architecture (Qwen2 LLM, MAR, LDM KL autoencoder), independently of the converter, and
checked against the golden tiny checkpoint and the keys of both released sizes.
"""

import copy

import torch


def release_shapes(reference: dict) -> tuple[dict, dict]:
    """(harmon_*.pth shapes, kl16.ckpt['model'] shapes) for a reference config dict."""
    return _harmon_shapes(reference), _vae_shapes(reference["vae"])


def random_release(reference: dict, seed: int = 0) -> tuple[dict, dict]:
    """Random tensors in the release layout (tied LM head equal to the embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    harmon, vae = release_shapes(reference)
    harmon = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in harmon.items()}
    harmon["llm.lm_head.weight"] = harmon["llm.model.embed_tokens.weight"].clone()
    vae = {name: 0.02 * torch.randn(shape, generator=generator) for name, shape in vae.items()}
    return harmon, vae


def variant(reference: dict, **changes) -> dict:
    """A copy of `reference` with `section__key=value` changes, e.g. mar__decoder_embed_dim=48."""
    result = copy.deepcopy(reference)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        result[section][key] = value
    return result


def _linear(shapes, prefix, out_features, in_features, bias=True):
    shapes[f"{prefix}.weight"] = (out_features, in_features)
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)


def _norm(shapes, prefix, width):
    shapes[f"{prefix}.weight"] = (width,)
    shapes[f"{prefix}.bias"] = (width,)


def _harmon_shapes(reference: dict) -> dict:
    llm, mar = reference["llm"], reference["mar"]
    hidden, vocab = llm["hidden_size"], llm["vocab_size"]
    head_dim = hidden // llm["num_attention_heads"]
    kv_width = llm["num_key_value_heads"] * head_dim
    shapes = {"llm.model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(llm["num_hidden_layers"]):
        prefix = f"llm.model.layers.{layer}"
        _linear(shapes, f"{prefix}.self_attn.q_proj", hidden, hidden)
        _linear(shapes, f"{prefix}.self_attn.k_proj", kv_width, hidden)
        _linear(shapes, f"{prefix}.self_attn.v_proj", kv_width, hidden)
        _linear(shapes, f"{prefix}.self_attn.o_proj", hidden, hidden, bias=False)
        _linear(shapes, f"{prefix}.mlp.gate_proj", llm["intermediate_size"], hidden, bias=False)
        _linear(shapes, f"{prefix}.mlp.up_proj", llm["intermediate_size"], hidden, bias=False)
        _linear(shapes, f"{prefix}.mlp.down_proj", hidden, llm["intermediate_size"], bias=False)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["llm.model.norm.weight"] = (hidden,)
    shapes["llm.lm_head.weight"] = (vocab, hidden)

    encoder, decoder = mar["encoder_embed_dim"], mar["decoder_embed_dim"]
    latent, width, buffer = mar["vae_embed_dim"], mar["diffloss_w"], mar["buffer_size"]
    num_tokens = (mar["img_size"] // mar["vae_stride"]) ** 2
    mlp_ratio = mar.get("mlp_ratio", 4)
    shapes.update(
        {
            "mar.fake_latent": (1, encoder),
            "mar.encoder_pos_embed_learned": (1, buffer + num_tokens, encoder),
            "mar.mask_token": (1, 1, decoder),
            "mar.decoder_pos_embed_learned": (1, buffer + num_tokens, decoder),
            "mar.diffusion_pos_embed_learned": (1, num_tokens, decoder),
            "mar.class_emb.weight": (mar["class_num"], encoder),
        }
    )
    _linear(shapes, "mar.z_proj", encoder, latent)
    _norm(shapes, "mar.z_proj_ln", encoder)
    for side, dim in (("encoder", encoder), ("decoder", decoder)):
        if side == "decoder":
            _linear(shapes, "mar.decoder_embed", decoder, encoder)
        for block in range(mar[f"{side}_depth"]):
            prefix = f"mar.{side}_blocks.{block}"
            _norm(shapes, f"{prefix}.norm1", dim)
            _linear(shapes, f"{prefix}.attn.qkv", 3 * dim, dim)
            _linear(shapes, f"{prefix}.attn.proj", dim, dim)
            _norm(shapes, f"{prefix}.norm2", dim)
            _linear(shapes, f"{prefix}.mlp.fc1", int(dim * mlp_ratio), dim)
            _linear(shapes, f"{prefix}.mlp.fc2", dim, int(dim * mlp_ratio))
        _norm(shapes, f"mar.{side}_norm", dim)
    net = "mar.diffloss.net"
    _linear(shapes, f"{net}.time_embed.mlp.0", width, 256)
    _linear(shapes, f"{net}.time_embed.mlp.2", width, width)
    _linear(shapes, f"{net}.cond_embed", width, decoder)
    _linear(shapes, f"{net}.input_proj", width, latent)
    for block in range(mar["diffloss_d"]):
        prefix = f"{net}.res_blocks.{block}"
        _norm(shapes, f"{prefix}.in_ln", width)
        _linear(shapes, f"{prefix}.mlp.0", width, width)
        _linear(shapes, f"{prefix}.mlp.2", width, width)
        _linear(shapes, f"{prefix}.adaLN_modulation.1", 3 * width, width)
    _linear(shapes, f"{net}.final_layer.linear", 2 * latent, width)
    _linear(shapes, f"{net}.final_layer.adaLN_modulation.1", 2 * width, width)
    _linear(shapes, "proj_in.0", hidden, encoder)
    _linear(shapes, "proj_in.2", hidden, hidden)
    _linear(shapes, "proj_out.0", hidden, hidden)
    _linear(shapes, "proj_out.2", encoder, hidden)
    return shapes


def _conv(shapes, prefix, out_channels, in_channels, kernel):
    shapes[f"{prefix}.weight"] = (out_channels, in_channels, kernel, kernel)
    shapes[f"{prefix}.bias"] = (out_channels,)


def _resnet(shapes, prefix, in_channels, out_channels):
    _norm(shapes, f"{prefix}.norm1", in_channels)
    _conv(shapes, f"{prefix}.conv1", out_channels, in_channels, 3)
    _norm(shapes, f"{prefix}.norm2", out_channels)
    _conv(shapes, f"{prefix}.conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        _conv(shapes, f"{prefix}.nin_shortcut", out_channels, in_channels, 1)


def _attention(shapes, prefix, channels):
    _norm(shapes, f"{prefix}.norm", channels)
    for part in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{prefix}.{part}", channels, channels, 1)


def _vae_shapes(vae: dict) -> dict:
    ch, multipliers, num_res_blocks, latent = vae["ch"], vae["ch_mult"], vae["num_res_blocks"], vae["embed_dim"]
    shapes = {}
    _conv(shapes, "encoder.conv_in", ch, 3, 3)
    resolution, block_in = vae["resolution"], ch
    for level, multiplier in enumerate(multipliers):
        block_out = ch * multiplier
        for block in range(num_res_blocks):
            _resnet(shapes, f"encoder.down.{level}.block.{block}", block_in, block_out)
            block_in = block_out
            if resolution in vae["attn_resolutions"]:
                _attention(shapes, f"encoder.down.{level}.attn.{block}", block_in)
        if level != len(multipliers) - 1:
            _conv(shapes, f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
            resolution //= 2
    for side in ("encoder", "decoder"):
        channels = ch * multipliers[-1]
        _resnet(shapes, f"{side}.mid.block_1", channels, channels)
        _attention(shapes, f"{side}.mid.attn_1", channels)
        _resnet(shapes, f"{side}.mid.block_2", channels, channels)
    _norm(shapes, "encoder.norm_out", block_in)
    _conv(shapes, "encoder.conv_out", 2 * latent, block_in, 3)
    _conv(shapes, "quant_conv", 2 * latent, 2 * latent, 1)
    _conv(shapes, "post_quant_conv", latent, latent, 1)
    block_in = ch * multipliers[-1]
    _conv(shapes, "decoder.conv_in", block_in, latent, 3)
    for level in reversed(range(len(multipliers))):
        block_out = ch * multipliers[level]
        for block in range(num_res_blocks + 1):
            _resnet(shapes, f"decoder.up.{level}.block.{block}", block_in, block_out)
            block_in = block_out
        if level != 0:
            _conv(shapes, f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    _norm(shapes, "decoder.norm_out", block_in)
    _conv(shapes, "decoder.conv_out", 3, block_in, 3)
    return shapes
