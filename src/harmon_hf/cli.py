"""The `harmon` command: generate, describe, chat, inpaint, train, eval and convert."""

import argparse
import json
import logging
import os
import re
import secrets
import sys
import threading
from pathlib import Path

from .loading import DEVICES, DTYPES, MODEL_ENVIRONMENT_VARIABLE, load_pipeline


DPM_SOLVER_STEPS = 20  # diffusion-head steps of `harmon eval --scheduler dpm-solver` unless --steps says otherwise
# DPM-Solver++ on the cosine schedule starts where alpha is ~5e-5 and its x_0 estimate explodes; diffusers' remedy
# is to start from the step where lambda = log(alpha / sigma) reaches this value (its documented value for cosine).
DPM_SOLVER_LAMBDA_MIN = -5.1
SEED_LIMIT = 2**64  # torch's generators take the seeds 0 <= seed < 2**64


# With torchao installed (the `quantization` extra), importing torch's and diffusers' integrations logs warnings that
# concern none of the command's work: CUDA kernels a CPU build cannot load, a deprecation inside torch, diffusers'
# torchao tensor types. The command's own rule is one line per error, so they are kept to errors.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


class CommandError(Exception):
    """A problem with the user's input, reported as one line."""


def open_image(path: str):
    from .images import open_image as read_checked_image

    if not Path(path).is_file():
        raise CommandError(f"no such file: {path}")
    return read_checked_image(path, name=path)


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """'512' or 'HxW' (e.g. 256x384) -> (height, width)."""
    if text is None:
        return None, None
    match = re.fullmatch(r"([0-9]+)(?:[xX]([0-9]+))?", text)  # ASCII digits: str.isdigit() also takes '²'
    if match is None:
        raise CommandError(f"--size must be N or HxW in pixels, got {text!r}")
    height = int(match[1])
    return height, int(match[2] or height)


def image_format(path: Path) -> str:
    """The image format that `path`'s suffix names (PNG for .png, JPEG for .jpg, ...)."""
    from PIL import Image

    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise CommandError(f"cannot tell an image format from {path.name!r}: end it in .png, .jpg or .webp")
    return image_format


def check_output(path: Path):
    """Refuse an output path that cannot be written, before the work that would go into it."""
    if path.is_dir():
        raise CommandError(f"{path} is a folder: give a file name")
    from .user_input import unwritable_folder

    image_format(path)
    try:
        blocker = unwritable_folder(path.parent)
    except OSError as error:  # a folder on the way that may not be searched
        raise CommandError(f"cannot write {path}: {error.strerror or error}") from error
    if blocker is not None:
        raise CommandError(f"cannot write {path}: {blocker} is not a writable folder")


def atomic_write(path: Path, write):
    """Call `write(file)` on a temporary file of its own beside `path`, then rename it to `path`, so that neither an
    interrupted run nor another process writing the same file leaves a partial one. The file gets the mode that a plain
    open() gives (0666 less the umask), so that a scorer running as another user can read it."""
    from .user_input import cannot_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = _new_partial_file(path)
    except OSError as error:
        raise CommandError(cannot_write(path, error)) from error
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except OSError as error:
        raise CommandError(cannot_write(path, error)) from error
    finally:
        temporary.unlink(missing_ok=True)


def _new_partial_file(path: Path) -> tuple[int, Path]:
    """A new empty file beside `path`, open for writing, and its path. Created as open() creates files, so the kernel
    applies the umask (mkstemp's files are 0600 whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:  # another writer's partial file drew the same name
            continue


def atomic_save(image, path: Path):
    """Write the image atomically (`atomic_write`) in the format that the path's suffix names."""
    save_format = image_format(path)
    atomic_write(path, lambda file: image.save(file, format=save_format))


def atomic_write_text(text: str, path: Path):
    """Write UTF-8 text atomically (`atomic_write`)."""
    atomic_write(path, lambda file: file.write(text.encode()))


# -- generate -------------------------------------------------------------------------------------------------------


def _generator(seed: int):
    """Seeds drive a CPU generator, so an image does not depend on the device it was made on."""
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


def seed_argument(text: str) -> int:
    """argparse's type of --seed: an integer that torch's generators take as it is (they refuse 2**64 and more, with
    "Overflow when unpacking long long", and take a negative seed as 2**64 - 1 + seed: the same images as another)."""
    try:
        seed = int(text)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1 ({SEED_LIMIT - 1}), got {text!r}")
    return seed


def check_seed_span(seed: int, count: int, what: str):
    """Refuse a --seed that torch takes but whose `count` seeds seed, seed + 1, ... (one per `what`) run past its
    range, before the model loads rather than hours of images later."""
    if seed + count > SEED_LIMIT:
        raise CommandError(f"--seed {seed} leaves too few seeds for {count} {what}: they use --seed to --seed + "
                           f"{count - 1}, and torch's seeds end at 2**64 - 1 (--seed at most {SEED_LIMIT - count})")


def check_preset(name: str | None):
    """Refuse an unknown --preset before the model loads."""
    if name is not None:
        from .modeling.modeling_harmon import sampling_preset

        sampling_preset(name)


def _generation_kwargs(args) -> dict:
    height, width = parse_size(args.size)
    check_preset(args.preset)
    return dict(
        height=height,
        width=width,
        num_iter=args.rounds,
        guidance_scale=args.guidance,
        num_inference_steps=args.steps,
        temperature=args.temperature,
        preset=args.preset,
        num_images_per_prompt=args.n,
    )


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def _generate(args):
    if (args.prompt is None) == (args.prompts is None):
        raise CommandError("give either a PROMPT or --prompts FILE.jsonl")
    if args.prompts is not None:
        from .benchmarks import PROMPTS_FILE_LAYOUT

        return generate_in_layout(args, PROMPTS_FILE_LAYOUT)
    kwargs = _generation_kwargs(args)
    for path in _output_paths(args.output, args.n):
        check_output(path)
    pipeline = _load(args)
    images = pipeline(args.prompt, generator=_generator(args.seed), **kwargs).images
    for image, path in zip(images, _output_paths(args.output, len(images))):
        atomic_save(image, path)
        print(f"wrote {path} ({image.width}x{image.height})")


def generate_in_layout(args, layout, run_record: bool = False):
    """Draw every prompt of the file `args.prompts` into the folder `args.outdir` in `layout` (a benchmark's
    `BenchmarkLayout`), `args.n` samples per prompt.

    Prompt i uses seed `--seed + i`, so the images do not depend on how the prompts are split between processes
    (`accelerate launch --multi_gpu --num_processes N -m harmon_hf.cli ...` shards them by index); a prompt whose
    images all decode whole is skipped, and every file is written atomically. With `run_record`, the main process
    writes OUTDIR/run.json (`_write_run_record`) when this run generated images, or when it is missing.
    """
    import time

    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    prompts = layout.read_prompts(args.prompts)
    kwargs = _generation_kwargs(args)
    layout.check_sampling(args.n, kwargs["height"], kwargs["width"])
    check_seed_span(args.seed, len(prompts), "prompts")
    state = PartialState(cpu=not torch.cuda.is_available())  # without GPUs, processes still form a (gloo) group
    outdir = Path(args.outdir)
    mine = [index for index in range(len(prompts)) if index % state.num_processes == state.process_index]
    todo = [index for index in mine if not layout.is_done(outdir, prompts[index], args.n)]
    seconds, settings = 0.0, None
    if todo:
        pipeline = _load(args)
        pipeline.to(state.device)
        pipeline.set_progress_bar_config(disable=True)
        settings = _sampling_settings(pipeline, kwargs, args)
        for index in tqdm(todo, desc=f"prompts (process {state.process_index})",
                          disable=not state.is_local_main_process):
            prompt = prompts[index]
            metadata_path = layout.metadata_path(outdir, prompt)
            if metadata_path is not None:
                atomic_write_text(prompt.metadata + "\n", metadata_path)
            start = time.perf_counter()
            samples = pipeline(prompt.text, generator=_generator(args.seed + index), **kwargs).images
            seconds += time.perf_counter() - start
            for image, path in zip(layout.arrange(samples), layout.image_paths(outdir, prompt, args.n)):
                atomic_save(image, path)
    # Every process takes part in the gathering, those with nothing left to do too.
    runs = gather_object([{"images": len(todo) * args.n, "seconds": seconds, "settings": settings}])
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    generated = sum(run["images"] for run in runs)
    if generated == 0:
        print(f"all {len(prompts)} prompts are already done in {outdir}")
    record_path = outdir / "run.json"
    if run_record and (generated or not record_path.is_file()):
        _write_run_record(args, runs, kwargs, len(prompts), state, record_path)


def _write_run_record(args, runs: list[dict], kwargs: dict, prompt_count: int, state, path: Path):
    """Write `path` (OUTDIR/run.json): the model, the sampling settings, the counts, the seconds per image of the
    images this run generated (all processes), the machine and the library versions; images are counted as samples (a
    DPG-Bench grid holds 4). A run that found every image made but no record (the run that made them stopped before
    writing it) writes one with the settings of its own arguments, 0 generated images and no timing."""
    import torch
    import transformers

    from .benchmarks import machine_description
    from .loading import choose_model

    generated = sum(run["images"] for run in runs)
    settings = next((run["settings"] for run in runs if run["settings"] is not None), None)
    if settings is None:  # nothing generated: the model's defaults fill in what the arguments leave open
        settings = _sampling_settings(_load(args).to(state.device), kwargs, args)
    record = {
        "benchmark": args.benchmark,
        "prompts_file": str(args.prompts),
        "model": choose_model(args.model),
        "sampling": settings,
        "images_per_prompt": args.n,
        "seed": args.seed,
        "prompts": prompt_count,
        "images": prompt_count * args.n,
        "generated_images": generated,
        "processes": state.num_processes,
        # one process's time per image: with N processes, N images are made in about this time
        "seconds_per_image": sum(run["seconds"] for run in runs) / generated if generated else None,
        "machine": machine_description(state.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)
    if not generated:
        print(f"wrote the missing {path}")


def _sampling_settings(pipeline, kwargs: dict, args) -> dict:
    """The sampling settings a generation used, the model's defaults filled in where the arguments gave none."""
    import dataclasses

    settings = pipeline.model.image_generation_settings(
        num_iter=kwargs["num_iter"], guidance_scale=kwargs["guidance_scale"], guidance_schedule=None,
        temperature=kwargs["temperature"], num_inference_steps=kwargs["num_inference_steps"], preset=kwargs["preset"],
    )
    image_size = pipeline.model.config.image_size
    return {
        "height": kwargs["height"] or image_size, "width": kwargs["width"] or image_size,
        **settings,
        "preset_name": args.preset or pipeline.model.image_generation_defaults["preset"],
        "preset": dataclasses.asdict(settings["preset"]),
        "dtype": str(pipeline.model.dtype).removeprefix("torch."),
        "device": str(pipeline.device),
    }


# -- understanding --------------------------------------------------------------------------------------------------


def stream_answer(pipeline, messages, images, max_new_tokens: int) -> str:
    """Print the assistant's answer to `messages` token by token as it is generated; returns the whole answer."""
    from transformers import TextIteratorStreamer

    from .answering import answer

    streamer = TextIteratorStreamer(pipeline.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome = {}

    def generate():
        try:
            outcome["answer"] = answer(pipeline, messages, images, max_new_tokens, streamer=streamer)
        except BaseException as error:  # raised again below; the streamer must still end, or the loop waits forever
            outcome["error"] = error
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    print()
    return outcome["answer"]


def _check_max_new_tokens(args):
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def _describe(args):
    from .answering import image_question

    _check_max_new_tokens(args)
    image = open_image(args.image)
    pipeline = _load(args)
    stream_answer(pipeline, [image_question(args.question)], [image], args.max_new_tokens)


def _chat(args):
    from .answering import image_question

    _check_max_new_tokens(args)
    if sys.stdin is None or sys.stdin.closed:
        raise CommandError("chat reads the questions from standard input, which is closed")
    image = open_image(args.image)
    pipeline = _load(args)
    messages = []
    print("Ask about the image; an empty line, 'exit' or Ctrl-D ends the chat.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if question in ("", "exit", "quit"):
            break
        messages.append(image_question(question) if not messages else {"role": "user", "content": question})
        print("harmon> ", end="", flush=True)
        reply = stream_answer(pipeline, messages, [image], args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})


def _inpaint(args):
    image, mask = open_image(args.image), open_image(args.mask)
    if image.size != mask.size:
        raise CommandError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
    kwargs = _generation_kwargs(args)
    for path in _output_paths(args.output, args.n):
        check_output(path)
    pipeline = _load(args)
    images = pipeline(args.prompt, image=image, mask_image=mask, generator=_generator(args.seed),
                      **kwargs).images
    for result, path in zip(images, _output_paths(args.output, len(images))):
        atomic_save(result, path)
        print(f"wrote {path} ({result.width}x{result.height})")


def _evaluate(args):
    from .shapes.evaluate import format_table, shapes_eval

    if args.n < 5:
        raise CommandError(f"--n must be at least 5 (one sample per category), got {args.n}")
    check_seed_span(args.seed, args.n, "samples")
    check_preset(args.preset)
    pipeline = _load(args)
    sampling = {"num_inference_steps": args.steps, "preset": args.preset}
    if args.rounds is not None:
        sampling["num_iter"] = args.rounds
    if args.scheduler == "dpm-solver":
        from diffusers import DPMSolverMultistepScheduler

        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config, variance_type=None, lambda_min_clipped=DPM_SOLVER_LAMBDA_MIN
        )
        sampling["num_inference_steps"] = args.steps or DPM_SOLVER_STEPS
    results = shapes_eval(pipeline, args.n, args.seed, **sampling)
    results["sampler"] = {"scheduler": args.scheduler, **sampling}
    print(format_table(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def _evaluate_benchmark(args):
    from .benchmarks import BENCHMARK_LAYOUTS

    layout = BENCHMARK_LAYOUTS[args.benchmark]
    if args.n is None:
        args.n = layout.images_per_prompt
    generate_in_layout(args, layout, run_record=True)


def _fid(args):
    from .benchmarks import FIDInceptionV3, frechet_inception_distance
    from .loading import choose_device

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = choose_device(args.device)
    extractor = None if args.inception is None else FIDInceptionV3(args.inception)
    result = frechet_inception_distance(args.real, args.generated, extractor, args.batch_size, device)
    print(f"FID {result['fid']:.4f} ({result['generated_images']} generated images, {result['real_images']} real)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"real": args.real, "generated": args.generated, **result}, indent=2) + "\n")


def _shapes(args):
    from .shapes.build import build_initial_model

    steps = {} if args.vae_steps is None else {"vae_steps": args.vae_steps}
    print(f"wrote {build_initial_model(args.output, seed=args.seed, **steps)}")


def _train(args):
    from accelerate import PartialState

    from .training import Recipe, train

    recipe = Recipe.load(args.recipe, args.overrides)
    final = train(recipe, resume=args.resume if args.resume != "latest" else True)
    if PartialState().is_main_process:  # under accelerate launch, once rather than once per process
        print(f"Saved the trained {'adapter' if recipe.lora else 'model'} to {final}")


def _export_lora(args):
    from .training import export_merged

    export_merged(args.base, args.adapter, args.output)
    print(f"Saved {args.base} with {args.adapter} merged to {args.output}")


def _convert(args):
    from .convert import convert

    convert(checkpoint=args.checkpoint, vae=args.vae, config=args.config, output=args.output,
            tokenizer=args.tokenizer, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite)
    print(f"Saved the converted model to {args.output}")


# -- parser ---------------------------------------------------------------------------------------------------------


def _add_model_argument(parser):
    parser.add_argument("--model", help=f"model folder or Hub id (default: ${MODEL_ENVIRONMENT_VARIABLE}, else the "
                                        "bundled model)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="precision of the weights and the computation (float32, the reference's; auto: bfloat16 "
                             "where the device computes it natively, float32 elsewhere)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: the GPU if there is one)")


def _load(args):
    """The pipeline of the model the arguments name, in their dtype, on their device."""
    return load_pipeline(args.model, getattr(args, "lora", None), dtype=args.dtype, device=args.device)


def _add_sampling_arguments(parser, images_per_prompt: int | None = 1, images_help: str = "images per prompt (1)"):
    parser.add_argument("--seed", type=seed_argument, default=0,
                        help="random seed, 0 to 2**64 - 1; the same seed gives the same image (0)")
    parser.add_argument("--size", help="image size in pixels, N or HxW, multiples of 16 (the model's default)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (the model's default, 3.0 "
                                                       "for the releases)")
    parser.add_argument("--rounds", type=int, help="masked-autoregressive rounds (the model's default, 64 for the "
                                                   "releases)")
    parser.add_argument("--steps", type=int, help="diffusion steps per round (the model's default, 100 for the releases)")
    parser.add_argument("--temperature", type=float, help="diffusion sampling temperature (the model's default, 1.0 "
                                                          "for the releases)")
    _add_preset_argument(parser)
    parser.add_argument("--n", type=int, default=images_per_prompt, help=images_help)


def _add_preset_argument(parser):
    parser.add_argument("--preset", help="sampling preset: reference (the reference sampler, exact), fast or fastest "
                                         "(see the README's Sampling presets; the model's default, reference for the "
                                         "releases)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as the command's other errors (--help shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="harmon", description="Harmon: unified image understanding and generation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from text",
                                   description="Generate an image from PROMPT, or one folder per line of a prompts "
                                               "file in GenEval's layout.")
    generate.add_argument("prompt", nargs="?", help="the text to draw")
    generate.add_argument("-o", "--output", default="harmon.png", help="PNG to write (harmon.png; -N suffixes for --n)")
    generate.add_argument("--prompts", help='JSON-lines file, one {"prompt": ...} object (plus any metadata) per line')
    generate.add_argument("--outdir", default="harmon-samples", help="output folder for --prompts (harmon-samples)")
    _add_model_argument(generate)
    generate.add_argument("--lora", help="a LoRA adapter folder from harmon train, merged into the model")
    _add_sampling_arguments(generate)
    generate.set_defaults(run=_generate)

    describe = commands.add_parser("describe", help="answer a question about an image (streamed)",
                                   description="Answer QUESTION about IMAGE, printing the answer as it is generated.")
    describe.add_argument("image", help="image file")
    describe.add_argument("question", nargs="?", default="Describe this image.", help="the question")
    describe.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (256)")
    _add_model_argument(describe)
    describe.set_defaults(run=_describe)

    chat = commands.add_parser("chat", help="talk about an image, several turns",
                               description="Interactive multi-turn chat about IMAGE.")
    chat.add_argument("image", help="image file")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (256)")
    _add_model_argument(chat)
    chat.set_defaults(run=_chat)

    inpaint = commands.add_parser("inpaint", help="regenerate the masked part of an image",
                                  description="Regenerate the white part of MASK in IMAGE from PROMPT.")
    inpaint.add_argument("image", help="image file")
    inpaint.add_argument("mask", help="mask image of the same size: white = regenerate")
    inpaint.add_argument("prompt", help="the text to draw")
    inpaint.add_argument("-o", "--output", default="harmon-inpainted.png", help="PNG to write")
    _add_model_argument(inpaint)
    _add_sampling_arguments(inpaint)
    inpaint.set_defaults(run=_inpaint)

    train = commands.add_parser("train", help="train or fine-tune with a recipe",
                                description="Run a training recipe (a YAML file, or the name of a bundled one: stage1, "
                                            "stage2, stage3, finetune, finetune_decoder_only, lora). Several processes: "
                                            "accelerate launch [--multi_gpu --num_processes N] -m harmon_hf.cli train ...")
    train.add_argument("recipe", help="recipe file or bundled recipe name")
    train.add_argument("overrides", nargs="*", help="key=value changes, dotted (training.max_steps=100, data.0.ratio=0.5)")
    train.add_argument("--resume", nargs="?", const="latest", default=False,
                       help="continue from the latest checkpoint in output_dir, or from the given checkpoint folder")
    train.set_defaults(run=_train)

    export_lora = commands.add_parser("export-lora", help="merge a LoRA adapter into its base model and save it",
                                      description="Save BASE with ADAPTER merged as a normal model folder.")
    export_lora.add_argument("--base", required=True, help="the base model folder or Hub id")
    export_lora.add_argument("--adapter", required=True, help="the adapter folder saved by harmon train")
    export_lora.add_argument("--output", required=True, help="folder to write the merged model to")
    export_lora.set_defaults(run=_export_lora)

    evaluate = commands.add_parser(
        "eval", help="evaluate a model on a benchmark (shapes, geneval, dpg, wise, fid)",
        description="Run ShapesEval, draw a benchmark's prompts in the layout its official scorer reads (GenEval, "
                    "DPG-Bench, WISE; several processes: accelerate launch [--multi_gpu --num_processes N] -m "
                    "harmon_hf.cli eval ...), or compute FID between two folders of images.")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    shapes_eval = benchmarks.add_parser("shapes", help="ShapesEval: generation and understanding on held-out cases",
                                        description="ShapesEval: generation on held-out prompts judged by a detector, "
                                                    "and understanding (exact match) on held-out images.")
    _add_model_argument(shapes_eval)
    shapes_eval.add_argument("--n", type=int, default=200, help="samples for generation and for understanding (200)")
    shapes_eval.add_argument("--json", help="also write the scores to this JSON file")
    shapes_eval.add_argument("--seed", type=seed_argument, default=0,
                             help="seed of the test cases and the sampling (0)")
    shapes_eval.add_argument("--rounds", type=int, help="masked-autoregressive rounds (the pipeline's default)")
    shapes_eval.add_argument("--steps", type=int, help="diffusion-head steps (the model's default)")
    _add_preset_argument(shapes_eval)
    shapes_eval.add_argument("--scheduler", choices=["harmon", "dpm-solver"], default="harmon",
                             help="diffusion-head sampler: the model's own (default) or DPM-Solver++ for few steps")
    shapes_eval.set_defaults(run=_evaluate)

    for name, title, prompts_help, layout_help, images_help in (
        ("geneval", "GenEval", "GenEval's prompts/evaluation_metadata.jsonl",
         "OUTDIR/<index:05d>/metadata.jsonl and samples/<n:04d>.png", "images per prompt (GenEval's 4)"),
        ("dpg", "DPG-Bench", "DPG-Bench's prompts folder (<item_id>.txt files) or dpg_bench.csv",
         "OUTDIR/<item_id>.png, the samples of a prompt in a 2x2 grid",
         "images per prompt: DPG-Bench's 4, in a 2x2 grid, or 1"),
        ("wise", "WISE", "a WISE prompts file (data_verified/merge.json, or another JSON list of prompt_id and "
                         "Prompt objects)", "OUTDIR/<prompt_id>.png", "images per prompt (WISE's 1)"),
    ):
        benchmark = benchmarks.add_parser(
            name, help=f"draw {title}'s prompts for its official scorer",
            description=f"Draw {title}'s prompts in the layout its official scorer reads ({layout_help}) and write "
                        "OUTDIR/run.json (model, settings, seconds per image, machine). Prompt i uses seed --seed + "
                        "i; finished prompts are skipped, so a stopped run continues where it stopped.")
        benchmark.add_argument("--prompts", required=True, metavar="PATH", help=prompts_help)
        benchmark.add_argument("--outdir", required=True, metavar="DIR", help="output folder")
        _add_model_argument(benchmark)
        _add_sampling_arguments(benchmark, images_per_prompt=None, images_help=images_help)
        benchmark.set_defaults(run=_evaluate_benchmark)

    fid = benchmarks.add_parser(
        "fid", help="FID between two folders of images (MJHQ-30K)",
        description="Frechet Inception Distance between the images of two folders and their subfolders: images "
                    "resized to 299x299 as clean-fid does (PIL bicubic), features of FID's Inception v3 (TensorFlow's "
                    "inception-2015-12-05, downloaded once into torch's hub cache unless --inception names the file).")
    fid.add_argument("--real", required=True, metavar="DIR", help="folder of reference images (MJHQ-30K: its images)")
    fid.add_argument("--generated", required=True, metavar="DIR", help="folder of generated images")
    fid.add_argument("--json", help="also write the result to this JSON file")
    fid.add_argument("--inception", metavar="FILE",
                     help="the TorchScript file inception-2015-12-05.pt, for a machine without internet")
    fid.add_argument("--batch-size", type=int, default=50, help="images per forward pass (50)")
    fid.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: the GPU if there is one)")
    fid.set_defaults(run=_fid)

    shapes = commands.add_parser("shapes", help="Harmon-Shapes: build the starting model of its training",
                                 description="Train the small autoencoder, learn the tokenizer and save a randomly "
                                             "initialised Harmon-Shapes, the `model` of the first shapes recipe.")
    shapes.add_argument("action", choices=["init"], help="what to do")
    shapes.add_argument("--output", default="runs/harmon-shapes/init", help="folder to write (runs/harmon-shapes/init)")
    shapes.add_argument("--vae-steps", type=int, help="autoencoder training steps (default: "
                                                     "harmon_hf.shapes.vae.VAE_STEPS)")
    shapes.add_argument("--seed", type=seed_argument, default=0, help="seed (0)")
    shapes.set_defaults(run=_shapes)

    convert = commands.add_parser(
        "convert",
        help="convert the released weights into a model folder",
        description="Convert a released Harmon checkpoint and its KL-16 VAE into a transformers model folder "
        "(safetensors), loadable with AutoModel.from_pretrained(folder, trust_remote_code=True).",
    )
    convert.add_argument("--checkpoint", required=True,
                         help="harmon_0.5b.pth, harmon_1.5b.pth or harmon_1.5b-o.pth; also a fine-tuned checkpoint of "
                              "the same names: an mmengine/xtuner iter_N.pth (the reference's and RecA's training), a "
                              ".safetensors file, or a folder of them (a DeepSpeed checkpoint consolidated by "
                              "zero_to_fp32 --safe_serialization)")
    convert.add_argument("--vae", required=True, help="kl16.ckpt")
    convert.add_argument("--config", required=True,
                         help="0.5b, 1.5b, or a JSON file of the reference's constructor arguments")
    convert.add_argument("--tokenizer", help="a Qwen2.5-Instruct tokenizer (folder or Hub id): <image> is added and "
                                             "the processor is saved beside the model")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    convert.add_argument("--output", required=True, help="folder to write the model to")
    convert.add_argument("--allow-nonfinite", action="store_true",
                         help="convert even when tensors hold NaN or inf values (refused by default)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args.run(args)
    except (CommandError, ValueError) as error:
        print(f"harmon {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"harmon {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
