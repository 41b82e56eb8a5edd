"""Fine-tuning through trl: SFTTrainer with its own vision-language collator and Harmon's processor."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoProcessor
from trl import SFTConfig, SFTTrainer

from harmon_hf import HarmonForConditionalGeneration
from tiny_data import COLORS, colour_image

QUESTION = "What colour is the square?"
FOLLOW_UP = "Describe the image."


def conversations() -> Dataset:
    """Eight two-turn conversations about one image each, in trl's vision-language format (`images`, `messages`)."""
    rows = []
    for name in list(COLORS) * 2:
        rows.append({
            "images": [colour_image(name)],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": name}]},
                {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"a {name} square"}]},
            ],
        })
    return Dataset.from_list(rows)


def test_sft_trainer_fine_tunes_on_the_assistant_answers(harmon_folder, tmp_path):
    model = HarmonForConditionalGeneration.from_pretrained(harmon_folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(harmon_folder)
    dataset = conversations()
    config = SFTConfig(
        output_dir=str(tmp_path), assistant_only_loss=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=8, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        # trl's defaults are for accelerators; this tiny model runs on the CPU
        bf16=False, activation_checkpointing=False, dataloader_pin_memory=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=dataset,
                         processing_class=processor)

    # trl's collator renders the chat through the processor; the loss covers what the assistant writes, nothing else.
    batch = trainer.data_collator([dataset[0], dataset[1]])
    for row, example in enumerate(dataset.select([0, 1])):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        answers = [message["content"][0]["text"] for message in example["messages"][1::2]]
        assert processor.tokenizer.decode(labelled) == "".join(f"{answer}<|im_end|>" for answer in answers)
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [processor.num_image_tokens()] * 2

    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 8 and len(losses) == 8
    assert trainer.state.epoch == pytest.approx(4)  # 8 steps of 2 x 2 conversations: accumulation ran
    # The untrained model is at chance: its loss is ~6.2 = ln(512), 512 being its vocabulary. The answers are four
    # colour words, read from the image, in a fixed phrase; 8 steps at lr 1e-2 bring the loss to ~2.2, falling at
    # every step. Halving it leaves a wide margin for numerics and still needs real learning, far beyond the noise of
    # a step.
    assert after < 0.5 * before, (before, after)
    assert losses[-1] < 0.5 * losses[0], losses
