"""The Space as an adversarial client meets it: plain HTTP to a real `spaces/app.py` process on 127.0.0.1, through
the endpoints that `view_api` lists (no browser, no gradio_client)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO

STARTUP_TIMEOUT = 120  # seconds for the server to start on a busy 2-core machine
CALL_TIMEOUT = 120
FAST = dict(num_iter=2, num_inference_steps=2)
# A request refused before the model gets it comes back within this; one that reaches it takes far longer (a
# 100,000-character prompt held a server for 69 s before the caps).
PROMPT_REFUSAL_SECONDS = 10
# How much the server's peak memory may grow while it refuses a long prompt (it grew by 6 GB before the caps).
REFUSAL_MEMORY_GROWTH = 200 * 2**20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python spaces/app.py` serving the tiny model, and the raw HTTP calls of Gradio's API."""

    def __init__(self, model: Path, upload_folder: Path):
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/gradio_api"
        environment = {**os.environ, "HARMON_MODEL": str(model), "GRADIO_ANALYTICS_ENABLED": "False",
                       "GRADIO_TEMP_DIR": str(upload_folder), "OMP_NUM_THREADS": "1"}
        environment.pop("GRADIO_SERVER_NAME", None)
        self.process = subprocess.Popen([sys.executable, str(REPO / "spaces" / "app.py"), "--port", str(self.port)],
                                        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                self.endpoints = json.loads(urllib.request.urlopen(f"{self.api}/info").read())["named_endpoints"]
                return
            except OSError:
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.5)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)

    def call(self, endpoint: str, *data) -> tuple[str, object]:
        """POSTs `data` to /call/ENDPOINT and reads its event stream: ("complete", outputs) or ("error", message)."""
        request = urllib.request.Request(f"{self.api}/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                         headers={"Content-Type": "application/json"})
        event_id = json.loads(urllib.request.urlopen(request, timeout=CALL_TIMEOUT).read())["event_id"]
        stream = urllib.request.urlopen(f"{self.api}/call/{endpoint}/{event_id}", timeout=CALL_TIMEOUT).read()
        event = None
        for line in stream.decode().splitlines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                data = json.loads(line.removeprefix("data: "))
                return event, data["error"] if event == "error" else data
        raise AssertionError(f"no result in the event stream: {stream[-500:]!r}")

    def upload(self, path: Path) -> dict:
        """Uploads a file as the page does; returns the file payload that refers to it."""
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes()
        body += f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{self.api}/upload", data=body,
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        (uploaded,) = json.loads(urllib.request.urlopen(request, timeout=CALL_TIMEOUT).read())
        return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}

    def peak_memory(self) -> int:
        """The server's peak resident memory since it started or `reset_peak_memory`, in bytes."""
        return self._memory("VmHWM")

    def memory(self) -> int:
        """The server's resident memory now, in bytes."""
        return self._memory("VmRSS")

    def reset_peak_memory(self):
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # the kernel's reset of VmHWM to VmRSS

    def _memory(self, field: str) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) * 1024


@pytest.fixture(scope="module")
def server(harmon_folder, tmp_path_factory):
    running = Server(harmon_folder, tmp_path_factory.mktemp("gradio-uploads"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def server_image(tmp_path_factory) -> Path:
    """An image on the server's disk that no client uploaded."""
    path = tmp_path_factory.mktemp("server-files") / "private.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path)
    return path


def _generate(server, prompt="a red circle", negative_prompt="", height=64, guidance=3.0, temperature=1.0,
              preset="reference", seed=0):
    """/generate as `view_api` lists it: prompt, height, width, images, negative prompt, guidance, rounds, steps,
    temperature, preset, seed, randomize seed."""
    return server.call("generate", prompt, height, 64, 1, negative_prompt, guidance, FAST["num_iter"],
                       FAST["num_inference_steps"], temperature, preset, seed, False)


def test_the_api_lists_the_three_model_calls(server):
    assert {"/generate", "/answer", "/inpaint"} <= set(server.endpoints)
    assert [p["parameter_name"] for p in server.endpoints["/answer"]["parameters"]] == [
        "image", "question", "history", "max_new_tokens"]


@pytest.mark.parametrize("with_file_marker", [False, True])
def test_understand_reads_no_file_that_was_not_uploaded(server, server_image, with_file_marker):
    payload = {"path": str(server_image)}
    if with_file_marker:
        payload["meta"] = {"_type": "gradio.FileData"}
    event, message = server.call("answer", payload, "What colour is the image?", [], 16)
    assert event == "error"
    if not with_file_marker:  # with the marker Gradio itself refuses it, with no message for the page
        assert message == "Upload the image: only files uploaded to this app are read."


@pytest.mark.parametrize("part", ["component", "file"])
def test_the_conversation_names_no_file(server, server_image, part):
    """A chat turn may carry a component or a file, which Gradio would read from the path the client names."""
    parts = {"component": {"type": "component", "component": "image", "value": {"path": str(server_image)},
                           "constructor_args": {}, "props": {}},
             "file": {"type": "file", "file": {"path": str(server_image)}}}
    history = [{"role": "user", "content": [parts[part]]}, {"role": "assistant", "content": [{"type": "text",
                                                                                               "text": "Red."}]}]
    event, message = server.call("answer", server.upload(server_image), "And now?", history, 16)
    assert event == "error"
    if part == "component":  # a file part Gradio refuses itself, with no message for the page
        assert message == "The conversation may hold only the text of user and assistant turns."


def test_inpaint_reads_no_file_that_was_not_uploaded(server, server_image):
    editor = {"background": {"path": str(server_image)}, "layers": [], "composite": {"path": str(server_image)}}
    event, _ = server.call("inpaint", editor, "a star", "", 3.0, FAST["num_iter"], FAST["num_inference_steps"], 1.0,
                           "reference", 0, False)
    assert event == "error"


def test_an_uploaded_image_is_answered(server, server_image):
    event, (chat, _) = server.call("answer", server.upload(server_image), "What colour is the image?", [], 16)
    assert event == "complete"
    assert [turn["role"] for turn in chat] == ["user", "assistant"]


def _inpaint(server, background: dict, layers: list[dict]):
    """/inpaint as `view_api` lists it, with the editor's background and paint layers as uploaded files."""
    editor = {"background": background, "layers": layers, "composite": None}
    return server.call("inpaint", editor, "a star", "", 3.0, FAST["num_iter"], FAST["num_inference_steps"], 1.0,
                       "reference", 0, False)


@pytest.fixture(scope="module")
def huge_images(tmp_path_factory) -> dict[str, Path]:
    """Small files that declare images beyond the limits: a 160000 x 100 sliver (47 KB, once padded to its 160000-pixel
    square: the server killed for memory), a square of 4100 x 4100 (16.8 Mpx, a side beyond 4096) and a
    decompression bomb of 20000 x 20000."""
    folder = tmp_path_factory.mktemp("huge")
    for name, size in {"sliver": (160000, 100), "square": (4100, 4100), "bomb": (20000, 20000)}.items():
        Image.new("1", size).save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in ("sliver", "square", "bomb")}


HUGE_IMAGE_MESSAGES = {
    "sliver": "The image is 160000x100 pixels: its longer side may be at most 4096.",
    "square": "The image is 4100x4100 pixels: its longer side may be at most 4096.",
    "bomb": "The image declares more pixels than are ever decoded here (its longer side may be at most 4096).",
}
# A refused image is answered within PROMPT_REFUSAL_SECONDS and raises the server's memory by less than this.
REFUSAL_IMAGE_MEMORY_GROWTH = 100 * 2**20


@pytest.mark.parametrize("tab", ["understand", "inpaint background", "inpaint layer"])
@pytest.mark.parametrize("image", ["sliver", "square", "bomb"])
def test_huge_images_are_refused_fast_with_bounded_memory(server, server_image, huge_images, image, tab):
    huge, small = server.upload(huge_images[image]), server.upload(server_image)
    calls = {"understand": lambda: server.call("answer", huge, "What is this?", [], 16),
             "inpaint background": lambda: _inpaint(server, huge, [small]),
             "inpaint layer": lambda: _inpaint(server, small, [huge])}
    memory_before, start = server.memory(), time.monotonic()
    server.reset_peak_memory()
    event, message = calls[tab]()
    assert time.monotonic() - start < PROMPT_REFUSAL_SECONDS
    assert server.peak_memory() - memory_before < REFUSAL_IMAGE_MEMORY_GROWTH
    expected = HUGE_IMAGE_MESSAGES[image]
    if tab == "inpaint layer":
        expected = f"The painted layer: {expected[0].lower()}{expected[1:]}"
    assert (event, message) == ("error", expected)
    assert server.call("answer", small, "What colour is the image?", [], 16)[0] == "complete"  # still serving


def test_a_paint_layer_of_another_size_than_the_image_is_refused(server, server_image, tmp_path):
    Image.new("RGBA", (16, 16), (255, 255, 255, 255)).save(tmp_path / "layer.png")
    event, message = _inpaint(server, server.upload(server_image), [server.upload(tmp_path / "layer.png")])
    assert (event, message) == ("error", "The painted layer: it is 16x16 pixels but the image is 32x32: they must be "
                                         "the same size.")


# After an allowed request of the largest image, the server's memory comes back to within this of what it was.
MEMORY_RETURN_MARGIN = 100 * 2**20


def test_memory_returns_after_the_largest_allowed_image(server, server_image, tmp_path):
    """glibc kept the blocks of a decoded 4096 x 4096 image in its heap: 225 MB stayed after one inpainting."""
    pixels = np.zeros((4096, 4096, 3), dtype=np.uint8)
    pixels[::7, ::5] = 200  # a pattern that PNG still compresses to 60 kB, under the upload limit
    Image.fromarray(pixels).save(tmp_path / "largest.png")
    layer = np.zeros((4096, 4096, 4), dtype=np.uint8)
    layer[:512, :512] = 255
    Image.fromarray(layer).save(tmp_path / "layer.png")
    small = server.upload(server_image)
    assert server.call("answer", small, "What colour is the image?", [], 16)[0] == "complete"
    idle = server.memory()
    largest = server.upload(tmp_path / "largest.png")
    server.reset_peak_memory()
    assert server.call("answer", largest, "What is in the image?", [], 16)[0] == "complete"
    assert _inpaint(server, largest, [server.upload(tmp_path / "layer.png")])[0] == "complete"
    assert server.peak_memory() - idle > 100 * 2**20  # the images were decoded: this is the large request
    assert server.call("answer", small, "What colour is the image?", [], 16)[0] == "complete"
    assert server.memory() - idle < MEMORY_RETURN_MARGIN


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda server: _generate(server, prompt="red " * 50_000),
         "The prompt has 200000 characters; at most 1000 are accepted."),
        (lambda server: _generate(server, negative_prompt="blurry " * 20_000),
         "The negative prompt has 140000 characters; at most 1000 are accepted."),
    ],
)
def test_long_texts_are_refused_fast_with_bounded_memory(server, call, message):
    peak_before = server.peak_memory()
    start = time.monotonic()
    assert call(server) == ("error", message)
    assert time.monotonic() - start < PROMPT_REFUSAL_SECONDS
    assert server.peak_memory() - peak_before < REFUSAL_MEMORY_GROWTH


def test_long_questions_and_conversations_are_refused(server, server_image):
    image = server.upload(server_image)
    event, message = server.call("answer", image, "why " * 50_000, [], 16)
    assert (event, message) == ("error", "The question has 200000 characters; at most 1000 are accepted.")
    history = [{"role": role, "content": [{"type": "text", "text": "a long turn " * 80}]}
               for role in ("user", "assistant") * 5]
    event, message = server.call("answer", image, "And then?", history, 16)
    assert (event, message) == ("error", "The conversation has 9609 characters; at most 8000 are accepted.")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(guidance=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    ],
)
def test_non_finite_settings_are_refused(server, settings, message):
    assert _generate(server, **settings) == ("error", message)


def test_generate_called_directly_as_the_api_lists_it_draws(server):
    """Without the click that numbers a run for its tab's Stop, as `view_api` lists /generate."""
    event, (gallery, seed) = _generate(server)
    assert event == "complete" and seed == 0
    assert len(gallery) == 1


def test_generate_takes_a_sampling_preset(server, pipe):
    event, (gallery, seed) = _generate(server, preset="fastest", seed=5)
    assert event == "complete" and seed == 5
    shown = np.asarray(Image.open(urllib.request.urlopen(gallery[0]["image"]["url"], timeout=CALL_TIMEOUT)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): bfloat16 kernels may round differently on two
    try:
        expected = pipe("a red circle", height=64, width=64, preset="fastest",
                        generator=torch.Generator().manual_seed(5), output_type="np", **FAST).images[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(shown, expected)
    assert _generate(server, preset="quick")[0] == "error"


def test_an_answer_of_no_tokens_is_refused_at_once(server, server_image):
    start = time.monotonic()
    event, message = server.call("answer", server.upload(server_image), "Colour?", [], 0)
    assert (event, message) == ("error", "Value 0 is less than minimum value 16.")
    assert time.monotonic() - start < PROMPT_REFUSAL_SECONDS
