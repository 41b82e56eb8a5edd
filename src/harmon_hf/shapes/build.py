"""`harmon shapes init`: everything Harmon-Shapes starts from, before the recipes train it.

The autoencoder (trained here, briefly), a byte-level BPE tokenizer learned on the world's language, and a randomly
initialised small Harmon around them, saved as a model folder that `harmon train` loads like any other.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..modeling import HarmonConfig, HarmonForConditionalGeneration
from ..modeling.processing_harmon import GENERATION_INSTRUCTION, IMAGE_TOKEN, UNCONDITIONAL_PROMPT
from .vae import SHAPES_VAE, VAE_STEPS, round_trip_score, train_vae
from .world import CELL_TOKENS, CELLS, IMAGE_SIZE, corpus_texts


# Qwen2.5's special tokens that Harmon's chat template uses, the image placeholder, then the tokens of a scene in
# cells (the language stage's).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, *CELL_TOKENS]
TOKENIZER_VOCAB_SIZE = 512

# A Qwen2 LLM, MAR and diffusion head sized for training on two CPU cores in minutes.
SHAPES_TEXT_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    # Eight heads of 24 rather than four of 48 (two key/value): trained alone to find the object a question names
    # from one token per cell (`python benchmarks/shapes/lookup.py MODEL --objects cells`), a fresh LLM with eight
    # was right 0.994 of the time after 300 steps, with four 0.762 after 300 and 0.773 after 400.
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
SHAPES_HARMON = {
    "encoder_hidden_size": 128,
    "encoder_num_hidden_layers": 2,
    "encoder_num_attention_heads": 4,
    "decoder_hidden_size": 128,
    "decoder_num_hidden_layers": 2,
    "decoder_num_attention_heads": 4,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "buffer_size": 4,
    "patch_size": 2,  # 2 x 2 latent pixels of the autoencoder (stride 8) per token: 16 px, one cell of the world
    "base_grid_size": CELLS,  # one latent token per cell of the world's grid
    "diffusion_head_hidden_size": 192,
    "diffusion_head_num_layers": 3,
    # Eight noise draws per token (the head is cheap next to the LLM) give the conditions a clearer gradient: in
    # 400-step runs the loss gap between the right and a shuffled prompt was 0.0031 with 8 against 0.0012 with 2.
    "diffusion_batch_mul": 8,
    # Sampling reveals one token per round, so the last ones are drawn with all but one visible: train on every
    # visible count (MAR's ratio >= 0.7 shows at most 30 % of the tokens), still mostly on high ratios.
    "mask_ratio_min": 0.0,
    "mask_ratio_std": 0.5,
    # The paper scales the understanding gradient into the MAR encoder by 0.1 to protect MAR's pretrained features;
    # this encoder starts from scratch, so understanding trains it fully.
    "visual_gradient_scale": 1.0,
    # An object token lay at a median distance of 11.8 from the empty cell's token (4.7 to 29 over the 36 objects
    # and 16 cells of the 64 px world; latents at unit standard deviation), so up to t ~ 945 of 1000 the
    # noisy token alone shows, by more than one noise standard deviation, whether a cell holds an object. Only above
    # that do the conditions decide, and there epsilon's loss weighs an error in the clean latent by
    # alpha_bar / (1 - alpha_bar) < 0.0074, v's by more than 1. (v also reads the clean latent without epsilon's
    # ~2e4-fold amplification near t = T, so sampling needs no clamp, which would cut the object tokens' largest
    # values.)
    "diffusion_prediction_type": "v_prediction",
    "image_size": IMAGE_SIZE,
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (as Qwen2.5's) learned on the world's captions, questions and answers."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    template_words = ["user", "assistant", GENERATION_INSTRUCTION.format(prompt=""), UNCONDITIONAL_PROMPT,
                      "Describe this image."]
    backend.train_from_iterator(corpus_texts() + template_words * 1000, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer


def shapes_config(tokenizer, vae_scale: float) -> HarmonConfig:
    text_config = {**SHAPES_TEXT_CONFIG, "vocab_size": len(tokenizer),
                   "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return HarmonConfig(text_config=text_config, vae_config=SHAPES_VAE, vae_scale=vae_scale,
                        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **SHAPES_HARMON)


def build_initial_model(output_dir: "str | Path", vae_steps: int = VAE_STEPS, seed: int = 0) -> Path:
    """Train the autoencoder, learn the tokenizer, and save a randomly initialised Harmon-Shapes with both."""
    from ..convert import processor_for

    vae, vae_scale = train_vae(steps=vae_steps, seed=seed)
    print(f"autoencoder round trip: {round_trip_score(vae):.3f} of ShapesEval's held-out scenes pass the detector")
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = HarmonForConditionalGeneration(shapes_config(tokenizer, vae_scale))
    model.model.vae.load_state_dict(vae.state_dict())
    processor = processor_for(model.config, tokenizer)
    model.generation_config.eos_token_id = processor.end_token_ids
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
