"""Configuration of Harmon: a Qwen2.5 LLM between the encoder and decoder of a MAR image generator."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


QWEN2_5_0_5B_INSTRUCT = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# The LDM KL-16 autoencoder used by MAR and Harmon, as a diffusers `AutoencoderKL` config.
KL16_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 256,
    "act_fn": "silu",
}

class HarmonConfig(PreTrainedConfig):
    r"""
    Configuration of [`HarmonForConditionalGeneration`]. The defaults describe Harmon-0.5B; harmon-hf's converter
    gives the other released size (`harmon_hf.convert.release_config("1.5b")`).

    Args:
        text_config (`dict` or `PreTrainedConfig`): the Qwen2 LLM.
        vae_config (`dict`): a diffusers `AutoencoderKL` config (the KL-16 VAE by default).
        vae_scale (`float`): latents are the VAE posterior's mode times this factor.
        patch_size (`int`): latent pixels per token side, as MAR's `patch_size`: a token holds a patch_size x
            patch_size patch of latent pixels, channels first (1 for the released models).
        encoder_hidden_size / encoder_num_hidden_layers / encoder_num_attention_heads: the MAR encoder ViT.
        decoder_hidden_size / decoder_num_hidden_layers / decoder_num_attention_heads: the MAR decoder ViT.
        mlp_ratio (`float`): MLP width over hidden width in the MAR blocks.
        layer_norm_eps (`float`): LayerNorm epsilon of the MAR blocks.
        attention_dropout / hidden_dropout (`float`): dropout of the MAR blocks in training.
        buffer_size (`int`): learned buffer slots prepended to the image tokens in the MAR encoder.
        base_grid_size (`int`): side of the token grid the position embeddings were learned on (256 px / 16).
        diffusion_head_hidden_size / diffusion_head_num_layers: the per-token diffusion MLP.
        num_train_timesteps (`int`): steps of the diffusion process the head was trained on.
        num_inference_steps (`int`): respaced diffusion steps used for sampling by default.
        diffusion_batch_mul (`int`): each target token is repeated this many times in the diffusion loss.
        diffusion_prediction_type (`str`): what the diffusion head predicts, "epsilon" (the released models, as MAR's)
            or "v_prediction" (v = sqrt(alpha_bar) epsilon - sqrt(1 - alpha_bar) x_0; its loss keeps weight on the clean
            latent at high noise, where the conditions decide what is drawn), as diffusers' `prediction_type`.
        diffusion_clip_range (`float`, *optional*): when set, sampling clamps the head's predicted clean latent to
            +-this value at every step (improved DDPM's `clip_denoised`); None (no clamp) for the released models.
        mask_ratio_min (`float`): lower end of the mask ratio in text-to-image training, a normal centred on 1 (all
            masked) truncated to [mask_ratio_min, 1].
        mask_ratio_std (`float`): standard deviation of that normal (MAR's 0.25).
        visual_gradient_scale (`float`): gradient scale on the visual features in understanding training.
        image_size (`int`): default image side in pixels for generation and understanding.
        image_token_id (`int`): id of the `<image>` placeholder token.
    """

    model_type = "harmon"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_5_0_5B_INSTRUCT),
    }

    text_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    vae_scale: float = 0.2325
    patch_size: int = 1
    encoder_hidden_size: int = 768
    encoder_num_hidden_layers: int = 12
    encoder_num_attention_heads: int = 12
    decoder_hidden_size: int = 768
    decoder_num_hidden_layers: int = 12
    decoder_num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    buffer_size: int = 64
    base_grid_size: int = 16
    diffusion_head_hidden_size: int = 1024
    diffusion_head_num_layers: int = 6
    num_train_timesteps: int = 1000
    num_inference_steps: int = 100
    diffusion_batch_mul: int = 4
    diffusion_prediction_type: str = "epsilon"
    diffusion_clip_range: float | None = None
    mask_ratio_min: float = 0.7
    mask_ratio_std: float = 0.25
    visual_gradient_scale: float = 0.1
    image_size: int = 512
    image_token_id: int = 151665
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self.check_extra_keys(kwargs)
        super().__post_init__(**kwargs)
        self.vae_config = dict(KL16_VAE if self.vae_config is None else self.vae_config)
        self.tie_word_embeddings = self.text_config.tie_word_embeddings
        for name in ("encoder", "decoder"):
            width = getattr(self, f"{name}_hidden_size")
            heads = getattr(self, f"{name}_num_attention_heads")
            if width % heads:
                raise ValueError(f"{name}_hidden_size ({width}) must be divisible by {name}_num_attention_heads ({heads})")
        if self.image_size % self.vae_stride:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of the VAE stride ({self.vae_stride})")

    @classmethod
    def check_extra_keys(cls, extra: dict):
        """Refuse, before any model is built, keys beyond the fields (from a config.json or keywords) that do not
        describe a Harmon model: another `model_type` (transformers would only warn), or a value this class computes
        (transformers would log the whole config, then fail on the property's missing setter)."""
        model_type = extra.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type is {model_type!r}, but a Harmon config's must be {cls.model_type!r}: "
                             "this config.json is not a Harmon model's")
        for key, value in extra.items():
            attribute = getattr(cls, key, None)
            if isinstance(attribute, property) and attribute.fset is None:
                raise ValueError(f"{key}={value!r} in the config is not a setting: {cls.__name__} computes {key} "
                                 "from its other fields, so the key must be removed")

    @property
    def vae_stride(self) -> int:
        """Pixels per latent token side: the VAE halves the resolution at every level but the last, and a token
        spans patch_size latent pixels."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1) * self.patch_size

    @property
    def token_channels(self) -> int:
        """Values per latent token: the VAE's channels over a patch_size x patch_size patch."""
        return self.vae_config["latent_channels"] * self.patch_size**2


__all__ = ["HarmonConfig"]
