"""Behaviour of the model beyond the golden vectors: text generation with the cache, image generation, training
gradients, bfloat16 and clear errors on bad input."""

import copy
import subprocess
import sys

import pytest
import torch

from conftest import assert_close


IMAGE_TOKEN_COUNT = 4 * 4 + 4  # a 64 px image: 16 tokens plus 4 buffers


def _prompt(model, text_ids, with_image=True):
    image = [model.config.image_token_id] * IMAGE_TOKEN_COUNT if with_image else []
    return [1, 2] + image + text_ids


def _left_pad(rows, pad_id=0):
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


@torch.no_grad()
def test_generate_uses_the_cache_and_batches_with_padding(tiny_model, golden):
    pixels = golden["und.pixel_values"]
    rows = [_prompt(tiny_model, [7, 8, 9, 10, 11]), _prompt(tiny_model, [12])]
    input_ids, attention_mask = _left_pad(rows)
    batched = tiny_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, max_new_tokens=6, do_sample=False
    )[:, input_ids.shape[1]:]
    for index, row in enumerate(rows):
        # Reference: greedy decoding without a cache, recomputing the whole sequence every step.
        sequence = torch.tensor([row])
        for _ in range(6):
            logits = tiny_model(input_ids=sequence, pixel_values=pixels[index : index + 1], use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert batched[index].tolist() == sequence[0, len(row):].tolist()


@torch.no_grad()
def test_generate_samples_reproducibly(tiny_model, golden):
    input_ids = torch.tensor([_prompt(tiny_model, [7, 8])])
    pixels = golden["und.pixel_values"][:1]
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(tiny_model.generate(input_ids=input_ids, pixel_values=pixels, do_sample=True, top_k=0,
                                           max_new_tokens=12).tolist())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def _generation_prompts():
    # Two conditional prompts, then their two unconditional prompts; right-padded with 0.
    input_ids = torch.tensor([[3, 4, 5, 6], [3, 7, 0, 0], [3, 9, 0, 0], [3, 9, 0, 0]])
    return input_ids, (input_ids != 0).long()


@torch.no_grad()
def test_generate_images_is_seeded(tiny_model):
    input_ids, attention_mask = _generation_prompts()
    kwargs = dict(height=64, width=32, num_iter=4, num_inference_steps=5, output_type="latent")
    first = tiny_model.generate_images(input_ids, attention_mask, generator=torch.Generator().manual_seed(3), **kwargs)
    again = tiny_model.generate_images(input_ids, attention_mask, generator=torch.Generator().manual_seed(3), **kwargs)
    other = tiny_model.generate_images(input_ids, attention_mask, generator=torch.Generator().manual_seed(4), **kwargs)
    assert first.shape == (2, 4, 2, 16)
    assert torch.equal(first, again) and not torch.equal(first, other)
    pixels = tiny_model.decode_latents(first)
    assert pixels.shape == (2, 3, 64, 32)
    linear = tiny_model.generate_images(input_ids, attention_mask, guidance_schedule="linear",
                                        generator=torch.Generator().manual_seed(3), **kwargs)
    assert not torch.equal(first, linear)


@torch.no_grad()
def test_inpainting_keeps_unmasked_tokens_exactly(tiny_model):
    input_ids, attention_mask = _generation_prompts()
    given = torch.randn(2, 4, 4, 16)
    mask = torch.zeros(2, 16)
    mask[:, [0, 5, 6, 15]] = 1  # regenerate four tokens of each image
    result = tiny_model.generate_images(input_ids, attention_mask, height=64, width=64, num_iter=3,
                                        num_inference_steps=4, image_latents=given, mask=mask, output_type="latent",
                                        generator=torch.Generator().manual_seed(0))
    keep = mask.reshape(2, 4, 4) == 0
    assert torch.equal(result[keep], given[keep])
    assert not torch.equal(result[~keep], given[~keep])


@torch.no_grad()
def test_mar_encoder_runs_once_per_round_under_guidance(tiny_model):
    calls = []
    handle = tiny_model.model.mar_encoder.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    try:
        input_ids, attention_mask = _generation_prompts()
        tiny_model.generate_images(input_ids, attention_mask, height=64, width=64, num_iter=3, num_inference_steps=2)
    finally:
        handle.remove()
    assert len(calls) == 3 and all(shape[0] == 2 for shape in calls)


def test_visual_gradient_scale(tiny_model, golden):
    """The understanding loss's gradient into the visual features is scaled by 0.1, the forward is unchanged."""
    gradients, losses = {}, {}
    for scale in (1.0, 0.1):
        model = copy.deepcopy(tiny_model).train()
        model.config.visual_gradient_scale = scale
        model.model.mar_encoder.stack.layers[0].attn.attention_dropout = 0.0
        loss = model.image_to_text_loss(golden["und.input_ids"], golden["und.attention_mask"],
                                        golden["und.pixel_values"], golden["und.labels"])
        loss.backward()
        losses[scale] = loss.item()
        gradients[scale] = model.model.proj_in.linear_2.weight.grad.clone()
        assert model.model.vae.encoder.conv_in.weight.grad is None  # the VAE stays frozen
        assert model.lm_head.weight.grad is not None
    assert losses[1.0] == losses[0.1]
    assert_close(gradients[0.1], 0.1 * gradients[1.0], tolerance=1e-6, name="scaled gradient")


def test_text_to_image_loss_trains_every_generation_module(tiny_model, golden):
    model = copy.deepcopy(tiny_model).train()
    loss = model.text_to_image_loss(golden["t2i.prompt_ids"], golden["t2i.prompt_mask"],
                                    pixel_values=golden["vae.pixels"])
    loss.backward()
    inner = model.model
    for module in (inner.mar_encoder, inner.mar_decoder, inner.diffusion_head, inner.proj_in, inner.proj_out,
                   inner.language_model.layers[0]):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert all(p.grad is None for p in inner.vae.parameters())


def test_random_training_mask_follows_the_truncated_ratio(tiny_model):
    generator = torch.Generator().manual_seed(0)
    counts = [int(tiny_model.model.random_mask(3, 256, generator=generator)[0].sum()) for _ in range(200)]
    assert min(counts) >= 0.7 * 256 and max(counts) <= 256
    masks = tiny_model.model.random_mask(3, 256, generator=generator)
    assert len(set(masks.sum(dim=1).tolist())) == 1 and not torch.equal(masks[0], masks[1])


def test_mask_ratio_spread_and_lower_end_come_from_the_config(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.config.mask_ratio_min, model.config.mask_ratio_std = 0.0, 1.0
    generator = torch.Generator().manual_seed(0)
    ratios = torch.tensor([model.model.random_mask(1, 256, generator=generator).mean().item() for _ in range(400)])
    # Nearly uniform on [0, 1] now (MAR's 0.25 spread would keep all of them above 0.7 with the default lower end).
    assert ratios.min() < 0.1 and (ratios < 0.5).float().mean() > 0.3 and ratios.max() <= 1.0


@torch.no_grad()
def test_bfloat16_end_to_end(tiny_model, golden):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    inputs = dict(input_ids=golden["und.input_ids"], attention_mask=golden["und.attention_mask"],
                  pixel_values=golden["und.pixel_values"])
    valid = golden["und.attention_mask"].bool()
    logits = model(**inputs).logits[valid].float()
    reference = tiny_model(**inputs).logits[valid]
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()

    cache = model.model.prefill_prompt(golden["gen.prompt_ids"], golden["gen.prompt_mask"])
    conditions = model.model.run_round(golden["gen.tokens"][:2], golden["gen.mask"][:2], (4, 4), cache,
                                       golden["gen.prompt_mask"]).conditions.float()
    assert (conditions - golden["gen.z"]).abs().max() <= 0.05 * golden["gen.z"].abs().max()

    input_ids, attention_mask = _generation_prompts()
    image = model.generate_images(input_ids, attention_mask, height=64, width=64, num_iter=4, num_inference_steps=10,
                                  generator=torch.Generator().manual_seed(0))
    assert image.dtype == torch.float32 and torch.isfinite(image).all()  # pixels in float32 whatever the weights


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.zeros(1, 3, 60, 64), "multiples of 16, got 60x64"),
        (torch.full((1, 3, 64, 64), 200.0), r"normalised to \[-1, 1\]"),
        (torch.zeros(1, 64, 64, 3), r"shape \(batch, 3, height, width\)"),
    ],
)
def test_bad_pixel_values(tiny_model, pixels, message):
    input_ids = torch.tensor([_prompt(tiny_model, [7])])
    with pytest.raises(ValueError, match=message):
        tiny_model(input_ids=input_ids, pixel_values=pixels)


def test_placeholder_count_must_match_the_images(tiny_model, golden):
    input_ids = torch.tensor([_prompt(tiny_model, [7])[:-3]])  # two placeholders short
    with pytest.raises(ValueError, match=r"18 image placeholder tokens .* 1 image\(s\) give 20 features"):
        tiny_model(input_ids=input_ids, pixel_values=golden["und.pixel_values"][:1])
    with pytest.raises(ValueError, match=r"40 image placeholder tokens .* 1 image\(s\) give 20"):
        tiny_model(input_ids=torch.tensor([_prompt(tiny_model, [7]) * 2]), pixel_values=golden["und.pixel_values"][:1])


def test_bad_generation_arguments(tiny_model):
    input_ids, attention_mask = _generation_prompts()
    with pytest.raises(ValueError, match="height must be a positive multiple of 16, got 40"):
        tiny_model.generate_images(input_ids, attention_mask, height=40, width=64)
    with pytest.raises(ValueError, match="equal numbers, got 3"):
        tiny_model.generate_images(input_ids[:3], attention_mask[:3], height=64, width=64)
    with pytest.raises(ValueError, match=r"guidance_schedule must be one of \('constant', 'linear'\), got 'cosine'"):
        tiny_model.generate_images(input_ids, attention_mask, height=64, width=64, num_iter=1, guidance_schedule="cosine")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, golden):
    inputs = dict(latents=golden["t2i.latents"], mask=golden["t2i.mask"], timesteps=golden["t2i.t"],
                  noise=golden["t2i.noise"])
    gradients = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            blocks = [model.model.mar_encoder.stack.layers[0], model.model.diffusion_head.res_blocks[0],
                      model.model.language_model.layers[0]]
            assert all(block.gradient_checkpointing for block in blocks)
        model.text_to_image_loss(golden["t2i.prompt_ids"], golden["t2i.prompt_mask"], **inputs).backward()
        gradients.append([p.grad.clone() for p in model.model.mar_decoder.parameters()])
    for plain, checkpointed in zip(*gradients):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_clip_range_bounds_the_predicted_latent_in_sampling_only(tiny_model):
    from harmon_hf import HarmonModel
    from harmon_hf.modeling import HarmonDiffusionScheduler

    clipped = HarmonDiffusionScheduler(clip_sample=True, clip_sample_range=5.0)
    plain = HarmonDiffusionScheduler()
    for scheduler in (clipped, plain):
        scheduler.set_timesteps(100)
    sample = torch.randn(4, 8)
    # At t = 999 an epsilon off by 0.05 puts x_0 about 1e3 away: the released sampler follows it, the clipped one not.
    output = torch.cat([sample + 0.05, torch.zeros(4, 8)], dim=-1)
    first = clipped.timesteps[0]
    assert clipped.step(output, first, sample).pred_original_sample.abs().max() <= 5.0
    assert plain.step(output, first, sample).pred_original_sample.abs().max() > 500
    x_start, noise = torch.randn(4, 8), torch.randn(4, 8)
    timesteps = torch.full((4,), 999)
    x_t = plain.add_noise(x_start, noise, timesteps)
    training = [HarmonDiffusionScheduler(clip_sample=c, clip_sample_range=5.0) for c in (True, False)]
    bounds = [s.variational_bound(torch.cat([noise + 0.05, torch.zeros(4, 8)], -1), x_start, x_t, timesteps)
              for s in training]
    assert torch.equal(bounds[0], bounds[1])  # the training loss never clips
    config = copy.deepcopy(tiny_model.config)
    config.diffusion_clip_range = 5.0
    model_scheduler = HarmonModel(config).diffusion_head.make_sampling_scheduler(100)
    assert model_scheduler.config.clip_sample and model_scheduler.config.clip_sample_range == 5.0
    released = tiny_model.model.diffusion_head.make_sampling_scheduler(100)
    assert not released.config.clip_sample  # the released models: as the reference


@torch.no_grad()
def test_patch_size_groups_latent_pixels_into_tokens(tiny_model):
    from harmon_hf import HarmonForConditionalGeneration, HarmonModel

    config = copy.deepcopy(tiny_model.config)
    config.patch_size = 2
    config.base_grid_size = config.base_grid_size // 2
    model = HarmonModel(config).eval()
    model.vae.load_state_dict(tiny_model.model.vae.state_dict())
    assert config.vae_stride == 2 * tiny_model.config.vae_stride
    assert config.token_channels == 4 * tiny_model.config.token_channels
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    unpatched = tiny_model.model.encode_images(pixels)  # (2, 4, 4, c): one latent pixel per token
    tokens = model.encode_images(pixels)  # (2, 2, 2, 4c): a 2 x 2 patch per token, channels first as in MAR
    assert tokens.shape == (2, 2, 2, 4 * unpatched.shape[-1])
    patch = unpatched[:, 2:4, 0:2].permute(0, 3, 1, 2).reshape(2, -1)  # the patch of token (row 1, column 0)
    assert torch.equal(tokens[:, 1, 0], patch)
    assert_close(model.decode_latents(tokens), tiny_model.model.decode_latents(unpatched), 1e-4, "decoded pixels")
    # Understanding takes one placeholder per (patched) token.
    image_ids = torch.tensor([[1, 2] + [config.image_token_id] * (2 * 2 + config.buffer_size) + [3]])
    logits = HarmonForConditionalGeneration(config).eval()(input_ids=image_ids, pixel_values=pixels[:1]).logits
    assert logits.shape[:2] == image_ids.shape


def test_fresh_model_has_mars_initialisation(tiny_model):
    from harmon_hf import HarmonModel

    model = HarmonModel(copy.deepcopy(tiny_model.config))
    head = model.diffusion_head
    # adaLN modulation and the head's output start at zero, so the head starts as the identity on its input path.
    for block in head.res_blocks:
        assert not block.modulation.weight.any() and not block.modulation.bias.any()
    assert not head.final_layer.modulation.weight.any() and not head.final_layer.linear.weight.any()
    xavier_linears = [model.mar_decoder.stack.layers[0].attn.qkv, model.mar_encoder.stack.layers[0].mlp.fc1,
                      model.mar_decoder.embed, head.input_proj, head.cond_embed, head.res_blocks[0].fc1]
    for linear in xavier_linears:
        bound = (6 / (linear.in_features + linear.out_features)) ** 0.5
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert not linear.bias.any()
    assert abs(head.time_embed.linear_1.weight.std().item() - 0.02) < 0.003
    assert abs(model.mar_decoder.pos_embed.std().item() - 0.02) < 0.003
    # The projections start as the reference's plain nn.Linear layers do, not at the LLM's N(0, 0.02).
    for linear in (model.proj_in.linear_1, model.proj_out.linear_2):
        bound = linear.in_features**-0.5
        for tensor in (linear.weight, linear.bias):
            assert tensor.abs().max() <= bound and tensor.abs().max() > 0.9 * bound


def test_loading_keeps_the_saved_weights(tiny_model, tmp_path):
    from harmon_hf import HarmonForConditionalGeneration

    tiny_model.save_pretrained(tmp_path)
    loaded = HarmonForConditionalGeneration.from_pretrained(tmp_path)
    saved = tiny_model.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())


def test_modeling_code_refuses_a_transformers_without_the_cache_argument():
    # As remote code the file is loaded whatever transformers is installed; an older one would drop `cache` silently.
    pretend_old_transformers = (
        "import importlib.metadata as metadata; installed = metadata.version; "
        "metadata.version = lambda name: '5.23.0' if name == 'transformers' else installed(name); "
        "import harmon_hf.modeling.modeling_harmon"
    )
    result = subprocess.run([sys.executable, "-c", pretend_old_transformers], capture_output=True, text=True)
    assert result.returncode != 0
    assert "transformers>=5.24 is required" in result.stderr and "found transformers==5.23.0" in result.stderr


def test_v_prediction_targets_v_and_recovers_the_clean_latent_at_every_noise_level():
    from harmon_hf.modeling import HarmonDiffusionScheduler

    scheduler = HarmonDiffusionScheduler(prediction_type="v_prediction")
    x_start, noise = torch.randn(3, 8), torch.randn(3, 8)
    timesteps = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alpha_bar_float64[timesteps].float()[:, None]
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_start
    assert_close(scheduler.training_target(x_start, noise, timesteps), velocity, 1e-5)
    x_t = scheduler.add_noise(x_start, noise, timesteps)
    # Near t = T the clean latent is ~2e4 times smaller than what the epsilon route would cancel to find it.
    assert_close(scheduler.original_from_prediction(velocity, x_t, timesteps), x_start, 1e-5)
    scheduler.set_timesteps(100)
    for timestep in scheduler.timesteps[::20]:
        x_t = scheduler.add_noise(x_start, noise, timestep)
        target = scheduler.training_target(x_start, noise, timestep)
        step = scheduler.step(torch.cat([target, torch.zeros_like(target)], -1), timestep, x_t)
        assert_close(step.pred_original_sample, x_start, 1e-4, name=f"t={int(timestep)}")
    epsilon_scheduler = HarmonDiffusionScheduler()
    assert torch.equal(epsilon_scheduler.training_target(x_start, noise, timesteps), noise)  # the released heads


def test_diffusion_loss_follows_the_prediction_type(tiny_model):
    from harmon_hf import HarmonModel

    config = copy.deepcopy(tiny_model.config)
    config.diffusion_prediction_type = "v_prediction"
    v_model = HarmonModel(config)
    v_model.load_state_dict(tiny_model.model.state_dict())
    target, noise = torch.randn(6, config.token_channels), torch.randn(6, config.token_channels)
    conditions = torch.randn(6, config.decoder_hidden_size)
    timesteps = torch.tensor([0, 100, 400, 700, 900, 999])
    with torch.no_grad():
        noisy = v_model.diffusion_head.noise_scheduler.add_noise(target, noise, timesteps)
        prediction = v_model.diffusion_head(noisy, timesteps, conditions)[:, : config.token_channels]
        terms = {"epsilon": tiny_model.model.diffusion_head.loss(target, conditions, timesteps, noise),
                 "v_prediction": v_model.diffusion_head.loss(target, conditions, timesteps, noise)}
    velocity = v_model.diffusion_head.noise_scheduler.training_target(target, noise, timesteps)
    assert_close(terms["v_prediction"]["mse"], ((velocity - prediction) ** 2).mean(-1), 1e-5)
    assert_close(terms["epsilon"]["mse"], ((noise - prediction) ** 2).mean(-1), 1e-5)
    assert not torch.allclose(terms["epsilon"]["vb"], terms["v_prediction"]["vb"])  # the variance sees x_0 v's way
    bad = copy.deepcopy(tiny_model.config)
    bad.diffusion_prediction_type = "sample"
    with pytest.raises(ValueError, match="'sample'.*epsilon.*v_prediction|epsilon.*v_prediction.*'sample'"):
        HarmonModel(bad)


@pytest.mark.parametrize(
    "settings, message",
    [
        # Zero used to mean "the default" silently; NaN and inf used to give a black image.
        (dict(height=0), "height must be a positive multiple of 16, got 0"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(temperature=float("inf")), r"temperature must be a finite number >= 0, got inf"),
        # 100000 px would allocate gigabytes; the LLM has 4096 positions.
        (dict(height=100000, width=100000), "a 100000x100000 image after a 4-token prompt needs 39062508 positions, "
                                            "more than the LLM's 4096"),
    ],
)
def test_sampling_settings_outside_the_rules_are_refused(tiny_model, settings, message):
    input_ids, attention_mask = _generation_prompts()
    with pytest.raises(ValueError, match=message):
        tiny_model.generate_images(input_ids, attention_mask, **{"num_iter": 1, "num_inference_steps": 2, **settings})


def test_sequences_beyond_the_llms_positions_are_refused(tiny_model):
    """Past max_position_embeddings RoPE runs on without an error and the outputs are garbage."""
    limit = tiny_model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"the sequence needs {limit + 1} positions, more than the LLM's {limit}"):
        tiny_model(input_ids=torch.ones(1, limit + 1, dtype=torch.long))
    cache = tiny_model(input_ids=torch.ones(1, limit, dtype=torch.long), use_cache=True).cache
    with pytest.raises(ValueError, match=f"needs {limit + 1} positions"):
        tiny_model(input_ids=torch.ones(1, 1, dtype=torch.long), cache=cache)
