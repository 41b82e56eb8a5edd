"""Answering questions about images: the one path from a conversation to Harmon's answer, for the `harmon` command,
the demo and the lmms-eval model."""

def image_question(question: str, num_images: int = 1) -> dict:
    """A user turn that asks `question` about the conversation's `num_images` images, which come before it."""
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}


def answer(pipeline, messages: list[dict], images: list, max_new_tokens: int, streamer=None,
           stopping_criteria=None) -> str:
    """The assistant's answer to `messages` about `images` (greedy decoding), without the chat markup.

    `streamer` receives the tokens as they come (a transformers streamer); `stopping_criteria` (a transformers
    `StoppingCriteriaList`) may end the answer early. The answer ends at `max_new_tokens` tokens, or sooner where the LLM's positions run out: a conversation
    that leaves no position for an answer is refused.
    """
    return answers(pipeline, [messages], [images], max_new_tokens, streamer=streamer,
                   stopping_criteria=stopping_criteria)[0]


def check_no_image_markers(conversations: list[list[dict]], marker: str):
    """Refuse a message whose text holds the image `marker`: the processor would take it for an image's place and
    find more places than images."""
    for number, messages in enumerate(conversations, 1):
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            texts = [part["text"] for part in parts if part["type"] == "text"]
            if any(marker in text for text in texts):
                raise ValueError(f"conversation {number}: a {message['role']} message's text holds a literal {marker} "
                                 f"marker; images are given as {{'type': 'image'}} parts, and the text must not "
                                 f"contain {marker}")


def answers(pipeline, conversations: list[list[dict]], images: list[list], max_new_tokens: int,
            **generate_kwargs) -> list[str]:
    """The assistant's answer to each of `conversations` about its `images` (one list per conversation), generated
    as one left-padded batch, without the chat markup.

    Decoding is greedy unless `generate_kwargs` (passed to `generate`: `do_sample`, `temperature`, `top_p`, a
    `streamer`, `stopping_criteria`, ...) say otherwise. Each answer ends where the model's generation_config says a
    turn ends (<|im_end|>, <|endoftext|>), at `max_new_tokens` tokens, or sooner where the LLM's positions run out
    after the longest prompt: a batch that leaves no position for an answer is refused.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not conversations:
        raise ValueError("conversations must hold at least one conversation, got an empty list")
    if len(images) != len(conversations):
        raise ValueError(f"got {len(images)} image lists for {len(conversations)} conversations: give one each")
    processor, model = pipeline.processor, pipeline.model
    check_no_image_markers(conversations, processor.image_token)
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    # The processor takes the batch's images as one list, in the order of the texts' image markers.
    flat_images = [image for conversation_images in images for image in conversation_images]
    inputs = processor(text=texts, images=flat_images or None).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    model.model.check_positions(prompt_length + 1, "the conversation and its answer")
    positions_left = model.config.text_config.max_position_embeddings - prompt_length
    generate_kwargs.setdefault("do_sample", False)
    output = model.generate(**inputs, max_new_tokens=min(max_new_tokens, positions_left),
                            pad_token_id=processor.tokenizer.pad_token_id, **generate_kwargs)
    return processor.post_process_image_text_to_text(output[:, prompt_length:])
