"""Does a Harmon's image generation listen to its prompt, and if not, where is the prompt lost?

In the first round of sampling every token is masked, so the prompt is all that tells one image from another: it
reaches the diffusion head through the LLM's output at the buffer slots, `proj_out`, the MAR decoder's input and
the decoder's conditions. `prompt_influence` swaps each image's prompt for another's and measures how much of the
change survives at each of these steps.

    python -m harmon_hf.shapes.diagnose MODEL [--count 32]
"""

import argparse
import random

import torch

from .world import caption, sample_split_scene


# The steps from the LLM to the diffusion head, in order.
PROMPT_PATH = ("llm_output", "projected", "decoder_input", "conditions")


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return ((after - before).norm() / before.norm()).item()


@torch.no_grad()
def prompt_influence(model, processor, count: int = 32, seed: int = 0) -> dict[str, float]:
    """{step of PROMPT_PATH: ||a - b|| / ||a||} for a = the values with `count` training captions, b = with the
    same captions rotated by one place, every image token masked. 0 means the prompt is ignored from that step on;
    a model that follows its prompt keeps a sizeable share of the change down to the conditions."""
    if count < 2:
        raise ValueError(f"count must be at least 2 (prompts are swapped between images), got {count}")
    harmon = model.model
    rng = random.Random(f"prompt-influence/{seed}")
    scenes = [sample_split_scene(rng, "train") for _ in range(count)]
    prompts = [processor.apply_generation_template(caption(scene, rng)) for scene in scenes]
    side = model.config.image_size // model.config.vae_stride
    tokens = torch.zeros(count, side * side, model.config.token_channels, device=model.device)
    mask = torch.ones(count, side * side, device=model.device)

    def path_values(texts: list[str]) -> dict[str, torch.Tensor]:
        inputs = processor.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        inputs = inputs.to(model.device)
        captured = {}
        hook = harmon.proj_out.register_forward_hook(
            lambda module, args, output: captured.update(llm_output=args[0], projected=output)
        )
        try:
            round_output = harmon.run_round(tokens, mask, (side, side), prompt_cache=None,
                                            prompt_attention_mask=inputs["attention_mask"],
                                            prompt_inputs_embeds=harmon.get_input_embeddings()(inputs["input_ids"]))
        finally:
            hook.remove()
        return {**captured, "decoder_input": round_output.encoded, "conditions": round_output.conditions}

    own, swapped = path_values(prompts), path_values(prompts[1:] + prompts[:1])
    return {step: relative_change(own[step], swapped[step]) for step in PROMPT_PATH}


def main(argv=None):
    from .. import HarmonProcessor
    from ..modeling import HarmonForConditionalGeneration

    parser = argparse.ArgumentParser(prog="python -m harmon_hf.shapes.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Harmon-Shapes model folder")
    parser.add_argument("--count", type=int, default=32, help="prompts to swap (default 32)")
    args = parser.parse_args(argv)
    model = HarmonForConditionalGeneration.from_pretrained(args.model).eval()
    influence = prompt_influence(model, HarmonProcessor.from_pretrained(args.model), args.count)
    print(f"share of a change of prompt left at each step, every token masked ({args.count} prompts):")
    for step, value in influence.items():
        print(f"  {step:<14} {value:.4f}")


if __name__ == "__main__":
    main()
