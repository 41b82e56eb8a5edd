"""`harmon train`: run a recipe with HarmonTrainer (also under `accelerate launch` for several processes)."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoProcessor, TrainingArguments, set_seed

from ..model_card import CARD_FILE, training_card
from ..modeling import HarmonForConditionalGeneration  # also registers Harmon with AutoProcessor
from .data import HarmonDataCollator, build_training_stream, check_source
from .recipe import Recipe
from .trainer import HarmonTrainer, check_checkpoint, latest_complete_checkpoint, writing

# Settings every Harmon run needs, whatever the recipe says under `training`.
FIXED_ARGUMENTS = {
    "remove_unused_columns": False,  # batches are grouped by task, not columns of the model's forward
    "accelerator_config": {"dispatch_batches": False},  # each process reads its own part of the streams
    "ddp_find_unused_parameters": True,  # a batch may hold only some of the tasks, leaving modules unused
    "logging_nan_inf_filter": False,  # True logs a NaN loss as the mean of the earlier ones (0.0 just after a log)
}
# The paper's optimiser and schedule; a recipe may override them under `training`.
DEFAULT_ARGUMENTS = {
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.01,  # below 1: a fraction of the run (1% linear warm-up)
    "logging_steps": 10,
    "save_steps": 1000,
    "save_total_limit": 2,
    "report_to": "none",
}


@contextmanager
def reading_model(name: str):
    """Any failure to read the recipe's `model` becomes a ValueError of one line naming it."""
    try:
        yield
    except Exception as error:
        from harmon_hf.user_input import first_line, is_missing_folder

        reason = "no such folder" if is_missing_folder(name) else first_line(error)
        raise ValueError(f"cannot load model {name!r}: {reason}") from error


def load_model(recipe: Recipe):
    with reading_model(recipe.model):
        model = HarmonForConditionalGeneration.from_pretrained(recipe.model, dtype=torch.float32)
    if recipe.image_size % model.config.vae_stride:
        raise ValueError(f"image_size {recipe.image_size} is not a multiple of the VAE stride {model.config.vae_stride}")
    model.requires_grad_(True)
    model.model.vae.requires_grad_(False)
    for name in recipe.frozen:
        getattr(model.model, name).requires_grad_(False)
    if recipe.lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                            target_modules=recipe.lora.target_modules)
        model = get_peft_model(model, config)
    return model


def training_arguments(recipe: Recipe) -> TrainingArguments:
    unknown = set(recipe.training) & set(FIXED_ARGUMENTS)
    if unknown:
        raise ValueError(f"training.{sorted(unknown)[0]} is set by harmon train and cannot be changed")
    steps = recipe.training.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        given = "it is not set" if steps is None else f"got {steps!r}"
        raise ValueError(f"training.max_steps must be a positive whole number, as streamed data has no length to "
                         f"count the steps by; {given}")
    training = {key: value for key, value in recipe.training.items() if key != "on_nonfinite"}  # Harmon's own
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # use_cpu lets processes launched without GPUs form a (gloo) group instead of each training alone.
    values = {**DEFAULT_ARGUMENTS, "bf16": bf16, "use_cpu": not torch.cuda.is_available(), "seed": recipe.seed,
              "weight_decay": recipe.weight_decay, "learning_rate": max(recipe.learning_rates.values()),
              **training, **FIXED_ARGUMENTS}
    try:
        return TrainingArguments(output_dir=recipe.output_dir, **values)
    except TypeError as error:
        raise ValueError(f"recipe key under training: {error}") from error


def train(recipe: Recipe, resume: bool | str = False) -> Path:
    """Train; returns the folder of the final model (or LoRA adapter). `resume=True` continues from the newest
    complete checkpoint in `output_dir`, a path from that checkpoint."""
    args = training_arguments(recipe)
    if resume is True:
        resume = str(latest_complete_checkpoint(recipe.output_dir))
    if resume:
        check_checkpoint(resume)
    with reading_model(recipe.model):
        processor = AutoProcessor.from_pretrained(recipe.model)
    for index, source in enumerate(recipe.data):
        if source.ratio > 0:
            check_source(recipe, index, processor)  # before any compute
    set_seed(recipe.seed)
    model = load_model(recipe)
    state = PartialState(cpu=not torch.cuda.is_available())
    stream = build_training_stream(recipe, processor, state.process_index, state.num_processes)
    trainer = HarmonTrainer(
        model=model,
        args=args,
        train_dataset=stream,
        data_collator=HarmonDataCollator(processor.tokenizer.pad_token_id, processor.image_processor, recipe.image_size),
        processing_class=processor,  # saved with every checkpoint and the final folder, so each one loads alone
        recipe=recipe,
    )
    if state.is_main_process:
        print(f"harmon train: {recipe.output_dir}, {args.max_steps} steps on {state.num_processes} process(es)")
    trainer.train(resume_from_checkpoint=resume or None)
    if trainer.state.global_step == 0:  # Trainer only warns when the data gives no batch at all
        raise ValueError(f"training took no step: the data gave no batch of {args.per_device_train_batch_size} "
                         f"sample(s); nothing was saved")
    if trainer.skipped_steps and state.is_main_process:
        print(f"harmon train: skipped {trainer.skipped_steps} optimizer step(s) for a non-finite loss or gradient")
    with writing(Path(recipe.output_dir) / "trainer_state.json"):
        trainer.save_state()  # the whole log history
    trainer.check_finite_weights()
    return save_final(trainer, recipe)


def save_final(trainer: HarmonTrainer, recipe: Recipe) -> Path:
    """A normal model folder with its processor and card (the adapter alone with LoRA), written under another name
    and renamed into place once complete: a folder of that name is always a whole model."""
    final = Path(recipe.output_dir) / ("adapter" if recipe.lora is not None else "final")
    staging = final.with_name(f"{final.name}.incomplete")
    main = trainer.args.should_save  # the main process, which alone writes the folder
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    with writing(final, incomplete=staging if main else None):
        trainer.save_model(str(staging))
        if main:
            training_card(final, recipe, trainer.state.global_step).save(staging / CARD_FILE)
    if main:
        replace_folder(staging, final)
    trainer.accelerator.wait_for_everyone()  # every process returns with the folder in place
    return final


def replace_folder(new: Path, old: Path):
    """Put folder `new` in the place of `old`, removing the folder there (an earlier run's) only once it has moved."""
    previous = old.with_name(f"{old.name}.previous")
    if old.exists():
        shutil.rmtree(previous, ignore_errors=True)
        old.rename(previous)
    new.rename(old)
    shutil.rmtree(previous, ignore_errors=True)
