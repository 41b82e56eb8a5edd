"""Answering questions about images: the one path from a conversation to Harmon's answer, for the `harmon` command
and the demo."""

def image_question(question: str) -> dict:
    """A user turn that asks `question` about the conversation's image."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def answer(pipeline, messages: list[dict], images: list, max_new_tokens: int, streamer=None,
           stopping_criteria=None) -> str:
    """The assistant's answer to `messages` about `images` (greedy decoding), without the chat markup.

    `streamer` receives the tokens as they come (a transformers streamer); `stopping_criteria` (a transformers
    `StoppingCriteriaList`) may end the answer early. The answer ends at `max_new_tokens` tokens, or sooner where the LLM's positions run out: a conversation
    that leaves no position for an answer is refused.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    processor, model = pipeline.processor, pipeline.model
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=images).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    model.model.check_positions(prompt_length + 1, "the conversation and its answer")
    positions_left = model.config.text_config.max_position_embeddings - prompt_length
    # The answer ends where the model's generation_config says a turn ends (<|im_end|>, <|endoftext|>).
    output = model.generate(**inputs, max_new_tokens=min(max_new_tokens, positions_left), do_sample=False,
                            streamer=streamer, stopping_criteria=stopping_criteria)
    return processor.post_process_image_text_to_text(output[0, prompt_length:])[0]
