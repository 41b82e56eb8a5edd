"""Harmon as an lmms-eval model: `lmms-eval --model harmon --model_args pretrained=PATH_OR_HUB_ID ...`.

lmms-eval finds the model through harmon-hf's `lmms_eval.models` entry point (`MODEL_MANIFEST`). Questions take the
project's one answering path (`answering.answers`): Harmon's chat template, the task's images first and then its
text, batched `batch_size` requests at a time.
"""

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from PIL import Image
from tqdm import tqdm

from .answering import answers, image_question
from .loading import load_pipeline


MODEL_MANIFEST = ModelManifest(model_id="harmon", simple_class_path="harmon_hf.lmms_eval_harmon.Harmon")
# The generation settings of lmms-eval tasks that Harmon honours; it ignores the others (e.g. llava's
# `image_aspect_ratio`), with a warning.
HONOURED_GENERATION_SETTINGS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")


class Harmon(lmms):
    """Harmon's understanding (image + question -> answer) for lmms-eval's `generate_until` and `loglikelihood`
    requests (not multi-round ones).

    Args (`--model_args` unless said otherwise):
        pretrained (`str`): the model folder or Hub id (a Harmon model with its processor).
        device (`str`, defaults to "auto"): "auto", "cpu", "cuda" or "mps" (see `loading.choose_device`), or
            lmms-eval's `--device`. Under `accelerate launch` (or torchrun) each process takes the device accelerate
            gives it (its own GPU) and answers its share of the requests.
        dtype (`str`, defaults to "float32"): "auto", "float32", "bfloat16" or "float16", as the `harmon` command.
        batch_size (`int`, defaults to 1): lmms-eval's `--batch_size` (it always passes one, so it cannot also come
            in `--model_args`): questions answered together (left-padded) by `generate_until`.
        max_new_tokens (`int`, defaults to 1024): the longest answer, for tasks that set no `max_new_tokens`.
        lora (`str`, *optional*): a LoRA adapter folder to merge in (from `harmon train`).
        max_batch_size: lmms-eval passes `--max_batch_size` here; it applies to automatic batch sizes, which Harmon
            does not have, so giving one is refused.
    """

    def __init__(self, pretrained: str | None = None, device: str = "auto", dtype: str = "float32",
                 batch_size: int | str = 1, max_new_tokens: int | str = 1024, lora: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if not pretrained:
            raise ValueError("the harmon model needs pretrained=PATH_OR_HUB_ID in --model_args "
                             "(a Harmon model folder or Hub id)")
        if max_batch_size is not None:
            raise ValueError(f"max_batch_size={max_batch_size!r}: harmon takes a fixed batch_size, not an automatic one")
        self.batch_size_per_process = _positive_integer("batch_size", batch_size)
        self.max_new_tokens = _positive_integer("max_new_tokens", max_new_tokens)
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            # Data parallel: the harness gives each process its share of the requests; accelerate made this
            # process's GPU the current one, where "cuda" puts the model.
            device = accelerator.device.type
        self.pipeline = load_pipeline(pretrained, lora=lora, dtype=dtype, device=device)
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self._ignored_settings_reported = set()

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    @property
    def device(self) -> torch.device:
        """Where the model is: the harness gathers the processes' request counts there."""
        return self.pipeline.model.device

    def task_images(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        """The images of one document, in the task's order (none for a text-only document)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(f"task {task} gives a {type(visual).__name__} visual (document {doc_id}): "
                                 "harmon answers about images only")
        return visuals

    def generate_until(self, requests) -> list[str]:
        """Each request's answer (`Instance.args`: context, generation settings, doc_to_visual, doc_id, task,
        split), in request order. Requests with the same generation settings are answered `batch_size` at a time,
        longest context first."""
        tokenizer = self.pipeline.processor.tokenizer
        results = []
        # Collator groups by generation settings (a batch shares them) and restores the request order afterwards.
        ordering = utils.Collator([request.args for request in requests],
                                  lambda args: (-len(tokenizer(args[0]).input_ids), args[0]), grouping=True)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for batch in ordering.get_batched(n=self.batch_size):
            contexts, all_settings, doc_to_visuals, doc_ids, tasks, splits = zip(*batch)
            max_new_tokens, stop_strings, generate_kwargs = self.generation_settings(all_settings[0])
            images = [self.task_images(*request) for request in zip(doc_to_visuals, tasks, splits, doc_ids)]
            conversations = [[_question(context, len(doc_images))] for context, doc_images in zip(contexts, images)]
            for context, settings, answer in zip(
                contexts, all_settings,
                answers(self.pipeline, conversations, images, max_new_tokens, **generate_kwargs),
            ):
                answer = _cut_at_stop_strings(answer, stop_strings)
                results.append(answer)
                self.cache_hook.add_partial("generate_until", (context, settings), answer)
                progress.update(1)
        progress.close()
        return ordering.get_original(results)

    def generation_settings(self, settings: dict) -> tuple[int, list[str], dict]:
        """(max_new_tokens, stop strings, `generate` keywords) from a task's generation settings.

        Decoding is greedy unless the task samples: `do_sample` true, or a `temperature` above 0 without
        `do_sample`; a temperature of 0 is greedy whatever `do_sample` says. `top_p` applies when sampling.
        """
        ignored = sorted(set(settings) - set(HONOURED_GENERATION_SETTINGS) - self._ignored_settings_reported)
        if ignored:
            logger.warning(f"harmon ignores the generation settings {ignored}")
            self._ignored_settings_reported.update(ignored)
        if settings.get("num_beams", 1) != 1:
            raise ValueError(f"num_beams={settings['num_beams']!r}: harmon decodes greedily or samples (num_beams 1)")
        until = settings.get("until") or []
        stop_strings = [until] if isinstance(until, str) else list(until)
        temperature = settings.get("temperature")
        if temperature == 0:
            sample = False
        else:
            sample = bool(settings.get("do_sample", temperature is not None and temperature > 0))
        generate_kwargs = {"do_sample": sample}
        if sample:
            generate_kwargs.update({name: settings[name] for name in ("temperature", "top_p")
                                    if settings.get(name) is not None})
        return settings.get("max_new_tokens", self.max_new_tokens), stop_strings, generate_kwargs

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per token, is greedy) of each request's continuation as the start of
        Harmon's answer to its context (`Instance.args`: context, continuation or doc_to_target, doc_to_visual,
        doc_id, task, split), one request at a time.

        The first value is the continuation's loss, not its log-probability: lmms-eval's `multiple_choice` scoring
        picks the choice with the lowest value, as its built-in models return their loss.
        """
        processor, model = self.pipeline.processor, self.pipeline.model
        results = []
        for context, continuation, doc_to_visual, doc_id, task, split in tqdm(
            [request.args for request in requests], disable=self.rank != 0, desc="Model Responding"
        ):
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self.task_images(doc_to_visual, task, split, doc_id)
            text = processor.apply_chat_template([_question(context, len(images))], add_generation_prompt=True)
            prompt = processor(text=text, images=images or None).to(model.device)
            continuation_ids = processor.tokenizer(continuation, add_special_tokens=False,
                                                   return_tensors="pt").input_ids.to(model.device)  # (1, n)
            # The logits at the last prompt position and at every continuation token but the last predict the
            # continuation's tokens.
            logits = model(input_ids=torch.cat([prompt["input_ids"], continuation_ids], dim=1),
                           pixel_values=prompt.get("pixel_values"),
                           logits_to_keep=continuation_ids.shape[1] + 1).logits[0, :-1].float()  # (n, vocab)
            log_probabilities = logits.log_softmax(dim=-1).gather(1, continuation_ids[0, :, None])  # (n, 1)
            is_greedy = bool((logits.argmax(dim=-1) == continuation_ids[0]).all())
            results.append((-log_probabilities.mean().item(), is_greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("harmon does not answer multi-round (generate_until_multi_round) tasks")


def _question(context: str, num_images: int) -> dict:
    # Harmon's prompts hold the images before the question. Tasks that mark image positions with "<image>" (it is
    # also Harmon's placeholder token) get the images first instead, as Qwen2.5-VL's lmms-eval model does.
    return image_question(context.replace("<image>", ""), num_images)


def _cut_at_stop_strings(answer: str, stop_strings: list[str]) -> str:
    """The answer up to the first of `stop_strings` (lmms-eval's `until`)."""
    for stop in stop_strings:
        if stop:
            answer = answer.split(stop, 1)[0]
    return answer.strip()


def _positive_integer(name: str, value) -> int:
    # model_args arrive as numbers or, where lmms-eval does not convert them, as strings.
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
