"""HarmonTrainer: transformers' Trainer with Harmon's three task losses, per-module learning rates and task logs."""

import errno
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from accelerate.data_loader import IterableDatasetShard
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import rotate_checkpoints

from ..modeling import HarmonForConditionalGeneration
from ..modeling.modeling_harmon import nonfinite_tensors
from ..user_input import first_line, system_error
from .recipe import MODULES, Recipe


# Written last into a checkpoint folder: a folder without it was interrupted while saving and is never resumed from.
CHECKPOINT_COMPLETE = "checkpoint-complete"


def latest_complete_checkpoint(output_dir: "str | Path") -> Path:
    complete = [folder.parent for folder in Path(output_dir).glob(f"checkpoint-*/{CHECKPOINT_COMPLETE}")]
    if not complete:
        raise ValueError(f"no complete checkpoint to resume from in {output_dir}")
    return max(complete, key=lambda folder: int(folder.name.split("-")[1]))


def check_checkpoint(folder: "str | Path"):
    """Refuse, in one line naming the file, a checkpoint file that resuming would fail on: a pickle holding more than
    tensors (torch.load(weights_only=True) refuses it), or a corrupt archive, safetensors or JSON file. Reads
    headers and pickles only: the tensors of an archive are mapped, not read."""
    for path in sorted(Path(folder).glob("*")):
        try:
            if path.suffix in (".pt", ".pth"):
                with safe_globals():  # numpy's arrays, as Trainer allows them in its rng_state files
                    torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except pickle.UnpicklingError as error:  # torch's message advises weights_only=False, which is not to be shown
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            asks = f" (it asks for {found.group(1)})" if found else ""
            raise ValueError(f"cannot resume from {path}: refused, it is not a plain tensor file{asks}") from error
        except Exception as error:  # any failure to read this one file: it is corrupt
            raise ValueError(f"cannot resume from {path}: the file is corrupt ({first_line(error)})") from error


def write_failure(error: BaseException, folder: Path) -> str | None:
    """Why a save into `folder` failed when the file system refused it (disk full, file too large, no permission),
    else None. The writers wrap the OS error: safetensors in "I/O error: <reason> (os error N)", torch.save in an
    error of its zip writer that gives no reason."""
    system = system_error(error)
    if system is not None:
        return system.strerror or str(system)
    if "inline_container" in str(error):
        space = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
        return os.strerror(errno.ENOSPC) if space < 2**20 else "the write failed"
    return None


@contextmanager
def writing(target: Path, incomplete: Path | None = None):
    """Saving `target`; a file system failure becomes a ValueError of one line. On any failure the folder this save
    was writing, `incomplete`, is removed: half a model or checkpoint must not pass for one."""
    try:
        yield
    except BaseException as error:
        if incomplete is not None:
            shutil.rmtree(incomplete, ignore_errors=True)
        reason = write_failure(error, target)
        if reason is None:
            raise
        removed = " (the incomplete folder was removed)" if incomplete is not None else ""
        raise ValueError(f"cannot write {target}: {reason}{removed}") from error


def harmon_model(model):
    """The HarmonForConditionalGeneration inside distributed (`.module`) and PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "peft_config") else model


def parameter_groups(model, learning_rates: dict[str, float], weight_decay: float) -> list[dict]:
    """One optimizer group per (module, decay) with the recipe's learning rate. As in the reference, biases, 1-D
    parameters and the diffusion head have no weight decay. Trainable parameters of modules without a learning rate
    are an error (they would silently never train)."""
    inner = harmon_model(model).model
    groups, assigned = [], set()
    for name in MODULES:
        parameters = [(n, p) for n, p in getattr(inner, name).named_parameters() if p.requires_grad]
        if not parameters:
            continue
        if name not in learning_rates:
            raise ValueError(f"{name} has trainable parameters but no learning rate in the recipe")
        for decay in (True, False):
            chosen = [p for n, p in parameters if (p.ndim >= 2 and name != "diffusion_head") == decay]
            if chosen:
                groups.append({"params": chosen, "lr": learning_rates[name], "weight_decay": weight_decay if decay else 0.0,
                               "module": name})
                assigned.update(id(p) for p in chosen)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in assigned]
    if stray:
        raise ValueError(f"trainable parameters outside Harmon's modules: {stray[:5]}")
    return groups


class HarmonTrainer(Trainer):
    """Batches hold one entry per task present (see `HarmonDataCollator`); the loss is the recipe-weighted sum.

    A subclass of `Trainer` rather than trl's `SFTTrainer`: two of Harmon's three losses are not next-token
    prediction on formatted text (the diffusion loss on image latents, the answer-only loss on image prompts), so
    SFTTrainer's dataset formatting and packing would not apply, while Trainer's loop, checkpointing, resumption and
    distribution are what the recipe needs.
    """

    def __init__(self, *args, recipe: Recipe, **kwargs):
        self.recipe = recipe  # before Trainer's __init__, which calls create_accelerator_and_postprocess
        super().__init__(*args, **kwargs)
        self.skipped_samples = Counter()  # bad samples skipped by reason, over the run
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (on_nonfinite: skip)
        self._step_loss = None  # the loss of the optimizer step under way, summed over its micro-batches
        self._task_loss_sums = defaultdict(float)
        self._task_loss_counts = defaultdict(int)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            # accelerate 1.16 switches an FSDP launch to FSDP on accelerators only: processes on CPUs (gloo) would
            # silently train with DDP, each holding the whole model. FSDP2 itself shards on CPUs, so switch here.
            plugin = FullyShardedDataParallelPlugin()  # from the launch's environment, as accelerate builds it
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled and "FULL" in str(state.fsdp_plugin.state_dict_type):
            # Seen with accelerate 1.16 and torch 2.13: resuming loads the full state dict on the main process, which
            # then waits in a broadcast that the other processes skip, forever. Refused before any compute.
            raise ValueError("fsdp_state_dict_type FULL_STATE_DICT: --resume from its checkpoints hangs under FSDP2; "
                             "use SHARDED_STATE_DICT (the final folder is a normal model folder either way)")
        if self.is_fsdp_enabled and state.fsdp_plugin.activation_checkpointing:
            # accelerate's checkpoint wrapper around each shard unit fails on the diffusion head, whose loss calls
            # the head from inside: its weights are then still shards ("got mixed torch.Tensor and DTensor"). The
            # model's own checkpointing recomputes the same blocks (decoder layers, MAR blocks, the head's blocks)
            # inside FSDP's hooks, so FSDP's switch turns it on instead.
            state.fsdp_plugin.activation_checkpointing, self.args.activation_checkpointing = False, True
        if state.distributed_type == DistributedType.DEEPSPEED and self.recipe.on_nonfinite == "skip":
            raise ValueError("training.on_nonfinite: skip does not work under DeepSpeed, which takes the optimizer "
                             "step inside the backward pass; use stop")

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        # The stream is already this process's share (`build_training_stream` gives every process the same task
        # sequence, on samples of its own); accelerate's IterableDatasetShard would hand each process another slice
        # of it, and so other tasks. Make it a passthrough, as Trainer does for its rank-aware batch samplers.
        if isinstance(dataloader.dataset, IterableDatasetShard):
            dataloader.dataset.num_processes, dataloader.dataset.process_index = 1, 0
        return dataloader

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = parameter_groups(model or self.model, self.recipe.learning_rates, self.recipe.weight_decay)
            self.optimizer = torch.optim.AdamW(
                groups, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.skipped_samples.update(inputs.pop("skipped", {}))
        outputs = model(task_batches=inputs, task_weights=self.recipe.loss_weights)
        for task, loss in outputs.task_losses.items():
            self._task_loss_sums[task] += loss.detach().float()  # a tensor: no device sync until the next log
            self._task_loss_counts[task] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # after the backward pass
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer calls this once per optimizer step, right before the step: the place to stop or skip it.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._guard_step(grad_norm)
        return grad_norm

    def _guard_step(self, grad_norm):
        """Stop the run (a ValueError) or skip this optimizer step when its loss or its gradient is not finite, the same
        way on every process: the loss is averaged over them, and the gradient norm is the same everywhere."""
        loss = float(self.accelerator.reduce(self._step_loss.detach().float(), "mean"))  # non-finite if one is
        self._step_loss = None
        values = {"loss": loss}
        # Under fp16 the gradient scaler skips the steps of inf gradients itself (and lowers its scale); under DeepSpeed
        # the norm can be unknown (None).
        if grad_norm is not None and self.accelerator.scaler is None:
            values["gradient norm"] = float(grad_norm)
        nonfinite = [name for name, value in values.items() if not math.isfinite(value)]
        if not nonfinite:
            return
        if self.recipe.on_nonfinite == "stop":
            shown = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
            raise ValueError(f"non-finite {' and '.join(nonfinite)} at step {self.state.global_step + 1} ({shown}): "
                             f"training stopped without saving a final model; lower the learning rates, or set "
                             f"training.on_nonfinite=skip to skip such steps")
        self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)  # AdamW leaves a parameter without a gradient untouched

    def check_finite_weights(self):
        """Refuse (ValueError) weights holding NaN or inf, as a final model must not; under FSDP each process checks
        its shards and they agree on the count."""
        model = harmon_model(self.model)
        names = nonfinite_tensors((name, parameter.to_local() if hasattr(parameter, "to_local") else parameter)
                                  for name, parameter in model.named_parameters())
        count = int(self.accelerator.reduce(torch.tensor(len(names), device=self.accelerator.device), "sum"))
        if count:
            raise ValueError(f"refusing to save the final model: {count} weight tensor(s) hold NaN or inf values "
                             f"({', '.join(names[:5]) or 'on other processes'}{', ...' if len(names) > 5 else ''})")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if not self.is_fsdp_enabled or _internal_call:  # FSDP checkpoints keep their shards, for --resume
            return super().save_model(output_dir, _internal_call)
        # A normal model folder from FSDP: every process takes part in gathering the full weights, then the main
        # process writes them from a plain (unsharded) model. Trainer's own FSDP save writes shards only, or, asked
        # for full weights, saves through the sharded model on the main process alone, whose collectives then hang.
        # (accelerate's get_state_dict follows the launch's fsdp_state_dict_type, and gives shards with SHARDED.)
        state_dict = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            trained = self.accelerator.unwrap_model(self.model)
            if hasattr(trained, "peft_config"):  # LoRA: the adapter alone, as without FSDP
                trained.save_pretrained(output_dir, state_dict=state_dict)
            else:
                with torch.device("meta"):
                    model = HarmonForConditionalGeneration(trained.config)
                model.load_state_dict(state_dict, assign=True)
                model.generation_config = trained.generation_config
                model.tie_weights()  # the LM head is the embeddings again, as in the trained model
                model.save_pretrained(output_dir)
            self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial):
        # Trainer deletes the checkpoints beyond save_total_limit at the end of its _save_checkpoint, before this one
        # is marked complete: a kill in between would leave nothing to resume from. So rotate after the marker.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:  # saving again into a complete checkpoint (a resumed run): not complete meanwhile
            (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
        try:
            with writing(folder, incomplete=folder if self.args.should_save else None):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            (folder / CHECKPOINT_COMPLETE).touch()
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs: add each task's mean loss since the last log, and the skipped samples
            for task, count in self._task_loss_counts.items():
                logs[f"loss_{task}"] = round(float(self._task_loss_sums[task]) / count, 6)
            self._task_loss_sums.clear()
            self._task_loss_counts.clear()
            for reason, count in self.skipped_samples.items():
                logs[f"skipped/{reason}"] = count
            if self.recipe.on_nonfinite == "skip":
                logs["skipped_steps"] = self.skipped_steps
            # Trainer has just reset its running loss by subtracting it from itself, which leaves a NaN in place.
            self._tr_loss.zero_()
        super().log(logs, start_time)
