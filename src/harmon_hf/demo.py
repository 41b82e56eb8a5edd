"""The Harmon demo: a Gradio app to generate images, ask questions about an image, and inpaint.

`build_demo(model)` returns the app, `launch(model)` serves it; the Hugging Face Space (`spaces/app.py`) and any
other launcher share both. The model is a loaded `HarmonPipeline`, a folder or Hub id, or None for
`$HARMON_MODEL`, else the bundled model.
"""

import ctypes
import io
import queue
import random
import threading
from abc import ABCMeta
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import numpy as np
import PIL.Image
import torch
from gradio.utils import get_upload_folder, is_in_or_equal
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .answering import answer, image_question
from .images import open_image, opened_image
from .loading import load_pipeline
from .modeling import SAMPLING_PRESETS, HarmonPipeline


# Limits that keep one request from holding the model for long while others wait.
MAX_IMAGE_SIDE = 1024
MAX_IMAGES_PER_PROMPT = 4
MAX_ROUNDS = 256
MAX_DIFFUSION_STEPS = 1000
MAX_NEW_TOKENS = 1024
MAX_SEED = 2**31 - 1
MAX_UPLOAD_SIZE = "10mb"
# Texts are capped before they reach the model: the LLM's memory grows with the square of the prompt's length, and
# a 100,000-character prompt took a server to 6.3 GB. The model refuses what exceeds its positions on top of this.
MAX_PROMPT_CHARACTERS = 1000  # a prompt, a negative prompt, a question
MAX_CONVERSATION_CHARACTERS = 8000  # a chat's earlier turns and the new question together
# glibc's mallopt parameter, and the block size from which memory goes back to the system when freed.
M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 8 * 2**20
# Requests waiting beyond this many are turned away with "queue full" rather than waiting for minutes.
MAX_QUEUE_SIZE = 32
# Gradio shows an image at its own size at most (object-fit: scale-down): a 48 px one would be a dot in its box.
# Enlarged to fill the box, as the gallery's images are.
PAGE_CSS = ":is(#chat-image, #inpaint-result) .image-frame {width: 100%} " \
           ":is(#chat-image, #inpaint-result) .image-frame img {object-fit: contain}"
DEFAULT_NEW_TOKENS = 256

EXAMPLES = Path(__file__).parent / "demo_examples"
TWO_SHAPES = str(EXAMPLES / "red-circle-blue-square.png")
STACKED_SHAPES = str(EXAMPLES / "green-triangle-yellow-square.png")

# Every model call (generation, inpainting, answers) joins this one concurrency group of size 1: the model runs one
# request at a time, the queue shows the others their place in line.
MODEL_CONCURRENCY = dict(concurrency_id="model", concurrency_limit=1)


def _user_error(message: str) -> gr.Error:
    """An error in what the user asked: its message shows in the page, and no stack trace in the page or the log."""
    return gr.Error(message, print_exception=False)


def _check_length(name: str, text: str | None, limit: int = MAX_PROMPT_CHARACTERS):
    if text is not None and len(text) > limit:
        raise _user_error(f"The {name} has {len(text)} characters; at most {limit} are accepted.")


def _read_uploaded_image(payload) -> PIL.Image.Image | None:
    """The image input's reading of a request: an uploaded file only, as an RGB PIL image.

    `gr.Image` opens whatever server path a request names when the payload lacks Gradio's file marker, which skips
    Gradio's own check that the file was uploaded; and a file that is no image, or a decompression bomb, would end
    in a bare "Error".
    """
    if payload is None:
        return None
    return _user_input(open_image, _uploaded_path(payload))


def _uploaded_path(file) -> str:
    """The path of a request's file, refused unless it lies in Gradio's upload folder."""
    if file.path is None or not is_in_or_equal(file.path, get_upload_folder()):
        raise _user_error("Upload the image: only files uploaded to this app are read.")
    return file.path


def _read_text_conversation(payload) -> list[dict]:
    """The chat's reading of a request: its turns as {"role": "user" | "assistant", "content": text}.

    The page's conversations hold text only; a part of another type is refused before Gradio reads it, since it
    would make Gradio open the file, or build the component, that a client names.
    """
    turns = []
    for message in payload.root if payload is not None else []:
        if message.role not in ("user", "assistant") or any(part.type != "text" for part in message.content):
            raise _user_error("The conversation may hold only the text of user and assistant turns.")
        turns.append({"role": message.role, "content": "".join(part.text for part in message.content)})
    return turns


def _reading_with(component_class: type, preprocess) -> type:
    """A subclass of a Gradio component whose requests are read by `preprocess(component, payload)`. On the class,
    not an instance: an example's click makes Gradio build the session's own copy from the class.

    It keeps the component's name, module and block name, by which Gradio tells its own components (served by the
    page's code) from custom ones and picks their code (a template such as ImageMask is its base's, ImageEditor's);
    and it is built past `ComponentMeta.__new__`, whose only other work concerns classes that declare events or
    `__init__`: it would write a .pyi stub beside this module."""
    served_as = component_class.__base__ if hasattr(component_class, "is_template") else component_class
    return ABCMeta.__new__(type(component_class), component_class.__name__, (component_class,),
                           {"preprocess": preprocess, "__module__": component_class.__module__,
                            "get_block_name": lambda component: served_as.__name__.lower()})


class StopButton:
    """The Stop of one tab: a press ends every run the same page session has asked for so far in that tab, running
    or still waiting in the queue; runs asked for later are not affected.

    Each run is numbered when it is asked for (`number_run`, before it joins the queue) and checks `is_pressed_for`
    between two steps, so a stopped run ends on its own and Gradio sees a handler that finished. (Gradio's
    `cancels=` kills the running task instead, which races with the run's last message and can leave Gradio's
    "Error" badge on the output.)
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._runs_asked: dict[str, int] = {}  # session hash -> runs numbered so far
        self._stopped_up_to: dict[str, int] = {}  # session hash -> runs with a number up to this are to stop

    def number_run(self, request: gr.Request) -> int:
        with self._lock:
            number = self._runs_asked.get(request.session_hash, 0) + 1
            self._runs_asked[request.session_hash] = number
        return number

    def press(self, request: gr.Request):
        with self._lock:
            self._stopped_up_to[request.session_hash] = self._runs_asked.get(request.session_hash, 0)

    def is_pressed_for(self, request: gr.Request, run_number: int | None) -> bool:
        if run_number is None:  # a direct API call: not numbered by a click, so no Stop of a page can reach it
            return False
        return run_number <= self._stopped_up_to.get(request.session_hash, 0)

    def forget(self, request: gr.Request):
        """The session has closed its page."""
        with self._lock:
            self._runs_asked.pop(request.session_hash, None)
            self._stopped_up_to.pop(request.session_hash, None)


class BackgroundRun:
    """Runs `work(report, should_stop)` in a thread holding `lock`; iterating gives what it `report`s as it comes,
    then raises what it raised, if anything; `result` is what it returned.

    The work checks `should_stop()` after every step, so the model is free again at once instead of finishing a
    result nobody will see. It turns true with `stop_requested()` (the user pressed Stop), or when the `with` block
    is left early: Gradio closes a handler that is a generator at a `yield` when the user leaves the page. Used as
    `with BackgroundRun(...) as run: for update in run: ... yield ...`. The lock, not Gradio's concurrency slot,
    guards the model: a closed request gives its slot back before its thread has finished its current step.
    """

    _FINISHED = object()

    def __init__(self, work, lock: threading.Lock, stop_requested=lambda: False):
        self._left = threading.Event()
        self.should_stop = lambda: self._left.is_set() or stop_requested()
        self.result = self._error = None
        self._updates = queue.SimpleQueue()
        threading.Thread(target=self._run, args=(work, lock), daemon=True).start()

    def _run(self, work, lock):
        try:
            with lock:
                if not self.should_stop():
                    self.result = work(self._updates.put, self.should_stop)
        except Exception as error:  # raised again in the handler's thread, where Gradio reports it
            self._error = error
        finally:
            self._updates.put(self._FINISHED)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._left.set()

    def __iter__(self):
        while (update := self._updates.get()) is not self._FINISHED:
            yield update
        if self._error is not None:
            raise self._error


class _AnswerStreamer(BaseStreamer):
    """Reports the answer decoded so far after every token, for a chat window that grows token by token
    (`TextStreamer` holds text back until a word ends)."""

    def __init__(self, tokenizer, report):
        self.tokenizer, self.report = tokenizer, report
        self.token_ids = None  # `generate` puts the prompt first; the answer's tokens follow

    def put(self, value):
        if self.token_ids is None:
            self.token_ids = []
            return
        self.token_ids += value.flatten().tolist()
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        # A character spread over several byte-level tokens decodes to U+FFFD until its last byte has come.
        self.report(text.rstrip("\ufffd"))

    def end(self):
        pass


class _StopWhen(StoppingCriteria):
    """Ends `generate` once `should_stop()` is true."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def _read_image_editor(editor: gr.ImageEditor, payload) -> dict | None:
    """The inpainting editor's reading of a request: {"background": the image in RGB, "painted": (H, W) bool, where
    any layer has paint}. The page sends the canvas as blobs (kept by the editor under the payload's id), an API
    client as uploaded files, read only from the upload folder; either is checked as `open_image` does before it is
    decoded, and a layer must be the image's size."""
    if payload is None:
        return None
    if payload.id is not None:
        blobs = editor.blob_storage.pop(payload.id, None)
        background = io.BytesIO(blobs.background) if blobs and blobs.background else None
        layers = [io.BytesIO(layer) for layer in blobs.layers if layer] if blobs else []
    else:
        background = payload.background and _uploaded_path(payload.background)
        layers = [_uploaded_path(layer) for layer in payload.layers]
    if background is None:
        return None
    image = _user_input(open_image, background)
    painted = np.zeros(image.size[::-1], dtype=bool)
    for source in layers:
        painted |= _user_input(_layer_paint, source, image.size)
    return {"background": image, "painted": painted}


def _layer_paint(source, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: where the editor's layer file `source` has paint; it must be `size` (width, height)."""
    with opened_image(source, "the painted layer") as layer:
        if layer.size != size:
            raise ValueError(f"it is {layer.width}x{layer.height} pixels but the image is {size[0]}x{size[1]}: they "
                             "must be the same size")
        return np.asarray(layer.convert("RGBA").getchannel("A")) > 0


def _user_input(read, *args):
    """`read(*args)`, its ValueError (what was wrong with the user's file) shown in the page."""
    try:
        return read(*args)
    except ValueError as error:
        message = str(error)
        raise _user_error(f"{message[0].upper()}{message[1:]}.") from None


def _painted_mask(painted: np.ndarray, size: tuple[int, int]) -> PIL.Image.Image:
    """White wherever `painted` (H, W) is, at `size` (width, height). The box filter keeps a thin stroke: a pixel is
    white if any painted pixel falls in it, so its patch is regenerated as the brush showed."""
    mask = PIL.Image.fromarray(painted.astype(np.uint8) * 255).resize(size, resample=PIL.Image.BOX)
    return mask.point(lambda value: 255 if value else 0)


UploadedImage = _reading_with(gr.Image, lambda image, payload: _read_uploaded_image(payload))
TextChatbot = _reading_with(gr.Chatbot, lambda chat, payload: _read_text_conversation(payload))
CheckedImageMask = _reading_with(gr.ImageMask, _read_image_editor)


class SamplingSettings(NamedTuple):
    """The controls the Generate and Inpaint tabs share, in the order of their handlers' parameters."""

    negative_prompt: gr.Textbox
    guidance_scale: gr.Slider
    num_iter: gr.Slider
    num_inference_steps: gr.Slider
    temperature: gr.Slider
    preset: gr.Dropdown
    seed: gr.Number
    randomize_seed: gr.Checkbox


class HarmonDemo:
    """The app's handlers around one loaded pipeline; `blocks()` lays out the page."""

    def __init__(self, pipeline: HarmonPipeline):
        pipeline.set_progress_bar_config(disable=True)  # progress goes to the page, not the server's terminal
        self.pipeline = pipeline
        self.lock = threading.Lock()
        config = pipeline.model.config
        self.native_size, self.stride = config.image_size, config.vae_stride
        self.sampling_defaults = pipeline.model.image_generation_defaults  # where the settings start
        self.stop_buttons: dict[str, StopButton] = {}  # tab -> its Stop, made as the page is laid out

    # -- handlers: generators that yield between two steps, to show progress. `run_number` is the run's number with
    # its tab's StopButton; a stopped run leaves the outputs as they were.

    def generate(self, prompt, height, width, num_images, negative_prompt, guidance_scale, num_iter,
                 num_inference_steps, temperature, preset, seed, randomize_seed, run_number, request: gr.Request,
                 progress=gr.Progress()):
        """Yields (images, seed) for the gallery and the seed field."""
        seed = self._seed(seed, randomize_seed)
        images = yield from self._sample(
            progress, self._stop_requested("generate", request, run_number), prompt, seed,
            negative_prompt=negative_prompt, height=height, width=width, num_images_per_prompt=num_images,
            guidance_scale=guidance_scale, num_iter=num_iter, num_inference_steps=num_inference_steps,
            temperature=temperature, preset=preset,
        )
        if images is not None:
            yield images, seed

    def inpaint(self, editor, prompt, negative_prompt, guidance_scale, num_iter, num_inference_steps, temperature,
                preset, seed, randomize_seed, run_number, request: gr.Request, progress=gr.Progress()):
        """Yields (image, seed): the editor's background with its painted part regenerated."""
        if not editor or editor["background"] is None:
            raise _user_error("Upload an image, then paint over the part to regenerate.")
        image = editor["background"]
        height, width = self._inpainting_size(image)
        mask = _painted_mask(editor["painted"], (width, height))
        if mask.getbbox() is None:
            raise _user_error("Paint over the part of the image to regenerate with the brush.")
        seed = self._seed(seed, randomize_seed)
        images = yield from self._sample(
            progress, self._stop_requested("inpaint", request, run_number), prompt, seed,
            negative_prompt=negative_prompt, height=height, width=width, image=image, mask_image=mask,
            guidance_scale=guidance_scale, num_iter=num_iter, num_inference_steps=num_inference_steps,
            temperature=temperature, preset=preset,
        )
        if images is not None:
            yield images[0], seed

    def answer(self, image, question, history, max_new_tokens, run_number, request: gr.Request):
        """Yields (chat, question box): the chat with the answer so far to `question` about `image`, after the turns
        already in `history`, token by token."""
        if image is None:
            raise _user_error("Upload an image to ask about.")
        if not question or not question.strip():
            raise _user_error("Type a question.")
        _check_length("question", question)
        turns = [*history, {"role": "user", "content": question}]
        _check_length("conversation", "".join(turn["content"] for turn in turns), MAX_CONVERSATION_CHARACTERS)
        messages = [image_question(turns[0]["content"]), *turns[1:]]  # the image belongs to the first question

        def work(report, should_stop):
            streamer = _AnswerStreamer(self.pipeline.processor.tokenizer, report)
            answer(self.pipeline, messages, [image], max_new_tokens, streamer=streamer,
                   stopping_criteria=StoppingCriteriaList([_StopWhen(should_stop)]))

        yield turns + [{"role": "assistant", "content": ""}], ""
        try:
            with BackgroundRun(work, self.lock, self._stop_requested("understand", request, run_number)) as run:
                for answer_so_far in run:
                    yield turns + [{"role": "assistant", "content": answer_so_far}], gr.skip()
        except ValueError as error:  # the checks of the conversation's length and the answer's settings
            raise _user_error(str(error)) from error

    # -- shared steps ----------------------------------------------------------------------------------------------

    def _stop_requested(self, tab: str, request: gr.Request, run_number: int):
        return lambda: self.stop_buttons[tab].is_pressed_for(request, run_number)

    @staticmethod
    def _seed(seed: int | None, randomize: bool) -> int:
        return random.randint(0, MAX_SEED) if randomize or seed is None else seed

    def _inpainting_size(self, image: PIL.Image.Image) -> tuple[int, int]:
        """(height, width) to inpaint `image` at: the model's image size for the longer side, the aspect ratio kept,
        each side a whole number of patches."""
        scale = self.native_size / max(image.size)
        width, height = (max(self.stride, round(side * scale / self.stride) * self.stride) for side in image.size)
        return height, width

    def _sample(self, progress, stop_requested, prompt: str, seed: int, **settings):
        """Runs the pipeline in the background, showing each finished round in `progress`, until it ends or
        `stop_requested()`. Before the first round and after each one it yields (no change, seed) for the handler's
        outputs (images, seed field): the seed in use shows at once. Returns the images, or None if stopped."""
        if not prompt or not prompt.strip():
            raise _user_error("Type a prompt.")
        _check_length("prompt", prompt)
        _check_length("negative prompt", settings["negative_prompt"])
        settings["negative_prompt"] = settings["negative_prompt"] or None  # an empty box means Harmon's own

        def work(report, should_stop):
            def after_round(pipeline, round_index, num_masked, tensors):
                report((round_index + 1, pipeline.num_timesteps))  # the preset may run fewer rounds than asked
                pipeline._interrupt = should_stop()
                return tensors

            generator = torch.Generator(device="cpu").manual_seed(seed)  # the same image on any device
            return self.pipeline(prompt, generator=generator, callback_on_step_end=after_round, **settings).images

        progress(0, desc="Generating")
        yield gr.skip(), seed
        try:
            with BackgroundRun(work, self.lock, stop_requested) as run:
                for finished_rounds in run:
                    progress(finished_rounds, desc="Generating", unit="rounds")
                    yield gr.skip(), seed
                return None if run.should_stop() else run.result
        except ValueError as error:  # the pipeline's checks of the settings
            raise _user_error(str(error)) from error

    # -- page ------------------------------------------------------------------------------------------------------

    def blocks(self) -> gr.Blocks:
        with gr.Blocks(title="Harmon") as demo:
            gr.Markdown("# Harmon\nOne model that generates images and answers questions about them. "
                        f"Model: `{_model_label(self.pipeline.model.config.name_or_path)}`.")
            with gr.Tab("Generate"):
                self._generate_tab()
            with gr.Tab("Understand"):
                self._understand_tab()
            with gr.Tab("Inpaint"):
                self._inpaint_tab()
            for stop_button in self.stop_buttons.values():
                demo.unload(stop_button.forget)
        return demo.queue(max_size=MAX_QUEUE_SIZE)

    def _generate_tab(self):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle left of a blue square",
                                    max_length=MAX_PROMPT_CHARACTERS, elem_id="generate-prompt")
                run, stop = _run_and_stop_buttons("generate", "Generate")
                with gr.Row():
                    size = dict(minimum=self.stride, maximum=MAX_IMAGE_SIDE, step=self.stride, precision=0)
                    height = gr.Number(self.native_size, label="Height", elem_id="height", **size)
                    width = gr.Number(self.native_size, label="Width", elem_id="width", **size)
                    num_images = gr.Slider(1, MAX_IMAGES_PER_PROMPT, value=1, step=1, precision=0, label="Images",
                                           elem_id="num-images")
                settings = _sampling_settings("generate", self.sampling_defaults)
            # Gradio widens fewer images than `columns` to the full width (fit_columns), where one square image is
            # taller than the box and scrolls in it. At half the width each image shows whole (48 px ones enlarged,
            # to about 270 px in a 1280 px window), and the box is tall enough for two rows: MAX_IMAGES_PER_PROMPT.
            gallery = gr.Gallery(label="Images", format="png", columns=2, fit_columns=False, height=600,
                                 object_fit="contain", elem_id="gallery")
        gr.Examples([["a red circle left of a blue square"], ["a green triangle above a yellow square"],
                     ["three purple circles on a white background"]], inputs=[prompt])
        self._on_run("generate", [run.click, prompt.submit], stop, self.generate,
                     inputs=[prompt, height, width, num_images, *settings], outputs=[gallery, settings.seed],
                     show_progress_on=gallery)

    def _understand_tab(self):
        with gr.Row():
            with gr.Column(scale=2):
                image = UploadedImage(type="pil", label="Image", sources=["upload", "clipboard"], height=320,
                                        elem_id="chat-image")
                max_new_tokens = gr.Slider(16, MAX_NEW_TOKENS, value=DEFAULT_NEW_TOKENS, step=1, precision=0,
                                           label="Longest answer (tokens)", elem_id="max-new-tokens")
            with gr.Column(scale=3):
                chat = TextChatbot(label="Conversation", elem_id="chat")
                question = gr.Textbox(label="Question", placeholder="What is in the image?",
                                      max_length=MAX_PROMPT_CHARACTERS, elem_id="question")
                ask, stop = _run_and_stop_buttons("understand", "Ask")
        gr.Examples([[TWO_SHAPES, "What shapes are in the image?"], [STACKED_SHAPES, "What colour is the triangle?"]],
                    inputs=[image, question])
        image.change(lambda: [], outputs=chat, queue=False)  # a conversation is about one image
        self._on_run("understand", [ask.click, question.submit], stop, self.answer,
                     inputs=[image, question, chat, max_new_tokens], outputs=[chat, question], show_progress="minimal")

    def _inpaint_tab(self):
        with gr.Row():
            with gr.Column():
                editor = CheckedImageMask(label="Image: paint over what to regenerate", sources=["upload", "clipboard"],
                                          layers=False, transforms=(), elem_id="inpaint-editor")
                prompt = gr.Textbox(label="Prompt", placeholder="a purple triangle", max_length=MAX_PROMPT_CHARACTERS,
                                    elem_id="inpaint-prompt")
                run, stop = _run_and_stop_buttons("inpaint", "Inpaint")
                settings = _sampling_settings("inpaint", self.sampling_defaults)
            result = gr.Image(label="Result", format="png", interactive=False, height=420, elem_id="inpaint-result")
        gr.Examples([[TWO_SHAPES, "a purple triangle"], [STACKED_SHAPES, "a red circle"]], inputs=[editor, prompt])
        self._on_run("inpaint", [run.click, prompt.submit], stop, self.inpaint, inputs=[editor, prompt, *settings],
                     outputs=[result, settings.seed], show_progress_on=result)

    def _on_run(self, tab: str, triggers, stop: gr.Button, handler, inputs: list, outputs: list, **options):
        """Wires one tab's model call: `triggers` number the request with the tab's StopButton at once (outside the
        queue), then it joins the model's queue with its number as the handler's last input; `stop` presses it."""
        stop_button = self.stop_buttons[tab] = StopButton()
        run_number = gr.State()
        numbered = gr.on(triggers, stop_button.number_run, outputs=run_number, queue=False, show_progress="hidden")
        numbered.then(handler, inputs=[*inputs, run_number], outputs=outputs, **options, **MODEL_CONCURRENCY)
        stop.click(stop_button.press, queue=False, show_progress="hidden")


def _model_label(name_or_path: str) -> str:
    """A Hub id as it is; a local folder by its name only, so that the page shows no path of the server's."""
    return Path(name_or_path).name if Path(name_or_path).is_dir() else name_or_path


def _run_and_stop_buttons(tab: str, label: str) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        return (gr.Button(label, variant="primary", scale=3, elem_id=f"{tab}-run"),
                gr.Button("Stop", variant="stop", scale=1, elem_id=f"{tab}-stop"))


def _sampling_settings(tab: str, defaults: dict) -> SamplingSettings:
    """The settings in an accordion that opens on demand, starting at the model's `defaults`
    (`image_generation_defaults`)."""
    with gr.Accordion("Settings", open=False, elem_id=f"{tab}-settings"):
        negative_prompt = gr.Textbox(label="Negative prompt", placeholder="(Harmon's default: Generate an image.)",
                                     max_length=MAX_PROMPT_CHARACTERS, elem_id=f"{tab}-negative-prompt")
        with gr.Row():
            guidance = gr.Slider(1.0, 10.0, value=defaults["guidance_scale"], step=0.1,
                                 label="Guidance scale", elem_id=f"{tab}-guidance")
            temperature = gr.Slider(0.1, 2.0, value=defaults["temperature"], step=0.05,
                                    label="Temperature", elem_id=f"{tab}-temperature")
        with gr.Row():
            rounds = gr.Slider(1, MAX_ROUNDS, value=defaults["num_iter"], step=1, precision=0,
                               label="Rounds (masked-autoregressive steps)", elem_id=f"{tab}-rounds")
            steps = gr.Slider(1, MAX_DIFFUSION_STEPS, value=defaults["num_inference_steps"], step=1, precision=0,
                              label="Diffusion steps per round", elem_id=f"{tab}-steps")
        # A model whose default is a custom preset (not a name) starts at None: the model's default.
        preset = gr.Dropdown(list(SAMPLING_PRESETS), value=defaults["preset"] if isinstance(defaults["preset"], str)
                             else None, label="Preset (reference: exact; fast, fastest: fewer rounds and steps, "
                             "bfloat16 where the processor has it)", elem_id=f"{tab}-preset")
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id=f"{tab}-seed")
            randomize = gr.Checkbox(True, label="Randomize seed", elem_id=f"{tab}-randomize-seed")
    return SamplingSettings(negative_prompt, guidance, rounds, steps, temperature, preset, seed, randomize)


def _unavailable_page(reason: str) -> gr.Blocks:
    with gr.Blocks(title="Harmon") as demo:
        gr.Markdown(f"# Harmon\n**No model is loaded.** {reason}\n\nSet the environment variable `HARMON_MODEL` to a "
                    "model folder or Hugging Face Hub id and restart the app.", elem_id="no-model")
    return demo


def build_demo(model: HarmonPipeline | str | None = None) -> gr.Blocks:
    """The demo for `model`: a loaded pipeline, a folder or Hub id, or None for $HARMON_MODEL, else the bundled
    model. If none can be loaded, the page says why."""
    if isinstance(model, HarmonPipeline):
        return HarmonDemo(model).blocks()
    try:
        pipeline = load_pipeline(model)
    except ValueError as error:  # no model to load, or one that cannot be loaded
        return _unavailable_page(str(error))
    return HarmonDemo(pipeline).blocks()


def _give_large_blocks_back_when_freed():
    """Have glibc map every block of 8 MiB or more on its own, so that freeing it gives it back to the system: by
    default the threshold grows to the largest block freed, and the heap then keeps a large image's memory (a server
    stayed 225 MB above idle after one 4096 x 4096 inpainting)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc; other C libraries keep their own policy
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def launch(model: HarmonPipeline | str | None = None, host: str = "127.0.0.1", port: int = 7860,
           **options) -> gr.Blocks:
    """Serves the demo at http://host:port. `options` go to `gr.Blocks.launch` (`prevent_thread_lock=True` returns
    at once, with the app running in the background)."""
    _give_large_blocks_back_when_freed()
    demo = build_demo(model)
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_SIZE, css=PAGE_CSS, **options)
    return demo
