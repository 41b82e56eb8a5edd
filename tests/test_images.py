"""Reading users' images: every mode PIL opens reaches the model as the picture it is (scaled, never clipped), and
sizes the processor cannot serve are refused, from the header, before anything is decoded or padded."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from harmon_hf import HarmonImageProcessor
from harmon_hf.cli import main
from harmon_hf.images import open_image
from harmon_hf.modeling.image_processing_harmon import MAX_ASPECT_RATIO, MAX_IMAGE_SIDE

# A grey ramp, 0 to 252: every value survives each mode's conversion, so each read can be checked against it.
RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # (16, 64)


def _saved(image: Image.Image, image_format: str) -> Image.Image:
    """`image` written as a file in `image_format` and opened again, as a user's file is."""
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    buffer.seek(0)
    return Image.open(buffer)


def _ramp_in(mode: str) -> Image.Image:
    """RAMP in `mode`, written with the mode's own full scale (65535 for 16 bits, 1.0 for floats)."""
    grey = Image.fromarray(RAMP)
    rgb = grey.convert("RGB")
    wide = RAMP.astype(np.uint32) * 257
    return {
        "L": lambda: _saved(grey, "PNG"),
        "RGB": lambda: _saved(rgb, "PNG"),
        "I;16": lambda: _saved(Image.frombytes("I;16", grey.size, wide.astype("<u2").tobytes()), "PNG"),
        "I;16B": lambda: _saved(Image.frombytes("I;16B", grey.size, wide.astype(">u2").tobytes()), "TIFF"),
        "I": lambda: _saved(Image.fromarray(wide.astype(np.int32)), "TIFF"),
        "F": lambda: _saved(Image.fromarray(RAMP.astype(np.float32) / 255), "TIFF"),
        "LA": lambda: _saved(Image.merge("LA", [grey, Image.new("L", grey.size, 255)]), "PNG"),
        "RGBA": lambda: _saved(rgb.convert("RGBA"), "PNG"),
        "P": lambda: _saved(rgb.quantize(64), "PNG"),
        "CMYK": lambda: _saved(rgb.convert("CMYK"), "TIFF"),
        "YCbCr": lambda: rgb.convert("YCbCr"),
        "LAB": lambda: _saved(rgb.convert("LAB"), "TIFF"),
        "HSV": lambda: rgb.convert("HSV"),
    }[mode]()


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "I;16B", "I", "F", "LA", "RGBA", "P", "CMYK", "YCbCr", "LAB",
                                  "HSV"])
def test_every_mode_is_read_as_the_picture_it_holds(mode):
    image = _ramp_in(mode)
    assert image.mode == mode
    rgb = np.asarray(HarmonImageProcessor.to_rgb(image)).astype(int)
    assert rgb.shape == (16, 64, 3)
    assert np.abs(rgb - RAMP[..., None]).max() <= 2, f"{mode} is not the ramp (PIL's own conversion clips 16 bits)"


def test_transparency_is_laid_over_white():
    red = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    red.paste((0, 0, 0, 0), (0, 0, 4, 8))  # the left half transparent black
    palette = red.convert("RGB").quantize(2)
    palette.info["transparency"] = palette.getpixel((0, 0))
    for image in (_saved(red, "PNG"), _saved(palette, "PNG"), _saved(red.convert("LA"), "PNG")):
        pixels = np.asarray(HarmonImageProcessor.to_rgb(image))
        assert (pixels[:, :4] == 255).all(), f"{image.mode}: the transparent half is not white"
        assert (pixels[:, 4:] != 255).any(), f"{image.mode}: the opaque half is gone"


def test_a_sixteen_bit_picture_is_answered_as_its_eight_bit_copy(tmp_path, capsys):
    """`harmon describe` of a 16-bit PNG saw solid white: PIL's convert("RGB") clips 16-bit values to 255."""
    from harmon_hf.demo import TWO_SHAPES

    grey = Image.open(TWO_SHAPES).convert("L")
    grey.save(tmp_path / "grey8.png")
    wide = np.asarray(grey).astype("<u2") * 257
    Image.frombytes("I;16", grey.size, wide.tobytes()).save(tmp_path / "grey16.png")
    pixels = [HarmonImageProcessor(image_size=64)(open_image(tmp_path / f"grey{bits}.png"))["pixel_values"]
              for bits in (8, 16)]
    assert (pixels[0] - pixels[1]).abs().max() < 1e-6
    answers = []
    for bits in (8, 16):
        assert main(["describe", str(tmp_path / f"grey{bits}.png"), "How many shapes are there?"]) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] and answers[0] == answers[1]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one row of pixels: decoding it fails."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    one_row = zlib.compress(bytes(1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", one_row) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size, rule", [((160000, 100), "longer side may be at most 4096"),
                                        ((16000, 1000), "longer side may be at most 4096"),
                                        ((5000, 5000), "longer side may be at most 4096"),
                                        ((4096, 400), f"longer side may be at most {MAX_ASPECT_RATIO} times its shorter one")])
def test_an_image_beyond_the_limits_is_refused_from_its_header(tmp_path, size, rule):
    """The header alone is enough to refuse: a file that holds no pixels gets the size's message, not a decoding
    error (and a 47 KB 160000 x 100 PNG, padded to its square, once took a server down)."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(*size))
    with pytest.raises(ValueError, match=rf"^{path}: the image is {size[0]}x{size[1]} pixels: its {rule}"):
        open_image(path, name=str(path))


def test_an_image_at_the_limits_is_read(tmp_path):
    Image.new("1", (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE // MAX_ASPECT_RATIO), 1).save(tmp_path / "wide.png")
    assert open_image(tmp_path / "wide.png").size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE // MAX_ASPECT_RATIO)


def test_the_processor_and_inpainting_refuse_a_sliver_before_padding_it(processor_and_pipe):
    processor, pipe = processor_and_pipe
    sliver = Image.new("1", (40000, 400))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True)
    with pytest.raises(ValueError, match="the image is 40000x400 pixels"):
        processor(text=text, images=[sliver])
    with pytest.raises(ValueError, match="the image is 40000x400 pixels"):
        pipe("a star", image=Image.new("RGB", (64, 64)), mask_image=sliver, num_iter=1, num_inference_steps=1)
    with pytest.raises(ValueError, match="the image is 40000x400 pixels"):
        pipe("a star", image=sliver, mask_image=Image.new("L", (64, 64), 255), height=64, width=64, num_iter=1,
             num_inference_steps=1)


@pytest.fixture
def processor_and_pipe(pipe):
    return pipe.processor, pipe


def test_the_answering_path_of_the_lmms_eval_model_refuses_a_sliver(pipe):
    """lmms-eval's documents bring PIL images of any size to `answers`, the one answering path."""
    from harmon_hf.answering import answers, image_question

    with pytest.raises(ValueError, match="the image is 40000x400 pixels"):
        answers(pipe, [[image_question("What is this?")]], [[Image.new("1", (40000, 400))]], 4)


def test_the_command_refuses_a_huge_image_in_one_line(tmp_path, capsys):
    path = tmp_path / "wide.png"
    path.write_bytes(_png_header_only(160000, 100))
    assert main(["describe", str(path), "What is in the image?"]) == 1
    error = capsys.readouterr().err
    assert error == (f"harmon describe: error: {path}: the image is 160000x100 pixels: its longer side may be at "
                     "most 4096\n")


@pytest.mark.parametrize("image_size", [1e6, 1_000_000, "48", True, 100])
def test_a_processor_config_with_an_impossible_image_size_is_refused(tmp_path, image_size):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "HarmonImageProcessor", "image_size": image_size, "vae_stride": 16}))
    with pytest.raises(ValueError, match=rf"image size must be at most 4096 and a positive multiple of 16, got "):
        HarmonImageProcessor.from_pretrained(tmp_path)
