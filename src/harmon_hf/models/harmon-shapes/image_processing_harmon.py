"""Image processor of Harmon: pixels in [-1, 1] at a side that is a multiple of the VAE stride."""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


# Understanding images are padded to a square with this colour before resizing, as in training.
PAD_COLOR = (127, 127, 127)
MODES = ("understanding", "generation")
# Checked from an image's header, before it is decoded: the padded square of a 47 KB 160000 x 100 PNG would take
# 77 GB. A side of 4096 bounds the square at 48 MiB of RGB; a ratio of 8 still leaves the shorter side 1/8 of it.
MAX_IMAGE_SIDE = 4096
MAX_ASPECT_RATIO = 8
# Transparent parts show as on a page: over white.
TRANSPARENCY_BACKGROUND = (255, 255, 255)


class HarmonImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for Harmon and turns decoded pixels back into images.

    Args:
        image_size (`int`, defaults to 512): side of the square images the model sees.
        vae_stride (`int`, defaults to 16): pixels per latent token side; sizes must be multiples of it.
        resample (`int`, defaults to `PIL.Image.BICUBIC`): resampling filter of the resize.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 512, vae_stride: int = 16, resample: int = Image.BICUBIC, **kwargs):
        super().__init__(**kwargs)
        if not _is_positive_integer(vae_stride):
            raise ValueError(f"vae_stride must be a positive integer, got {vae_stride!r}")
        self.image_size = image_size
        self.vae_stride = vae_stride
        self.resample = resample
        self.check_size(image_size)

    def check_size(self, size: int):
        """Refuse a side that images cannot be resized to: not a whole number of latent tokens, or beyond
        MAX_IMAGE_SIDE."""
        if not _is_positive_integer(size) or size % self.vae_stride or size > MAX_IMAGE_SIDE:
            raise ValueError(f"image size must be at most {MAX_IMAGE_SIDE} and a positive multiple of "
                             f"{self.vae_stride}, got {size!r}")

    @staticmethod
    def pad_to_square(image: Image.Image) -> Image.Image:
        """Pad with PAD_COLOR to a square, the original centred (offset rounded down)."""
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        square = Image.new(image.mode, (side, side), PAD_COLOR)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square

    @staticmethod
    def center_crop_square(image: Image.Image) -> Image.Image:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))

    @staticmethod
    def check_image_size(width: int, height: int):
        """Refuse an image whose sides the processor cannot serve: beyond MAX_IMAGE_SIDE (the padded square is the
        longer side squared) or MAX_ASPECT_RATIO (the picture would shrink to a sliver of the square)."""
        if min(width, height) < 1:
            raise ValueError(f"the image is {width}x{height} pixels: it has no pixels")
        if max(width, height) > MAX_IMAGE_SIDE:
            raise ValueError(f"the image is {width}x{height} pixels: its longer side may be at most {MAX_IMAGE_SIDE}")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ValueError(f"the image is {width}x{height} pixels: its longer side may be at most "
                             f"{MAX_ASPECT_RATIO} times its shorter one")

    @classmethod
    def to_rgb(cls, image: Image.Image) -> Image.Image:
        """`image` as 8-bit RGB, checked by `check_image_size` before it is decoded. Deeper modes are scaled (PIL's
        own conversion clips 16-bit and float pixels to 255: white), transparency is laid over white."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"images must be PIL images, got {type(image).__name__}")
        cls.check_image_size(*image.size)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = Image.fromarray(_to_uint8(np.asarray(image)))
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("LA", "PA", "RGBa"):
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            return Image.alpha_composite(Image.new("RGBA", image.size, TRANSPARENCY_BACKGROUND + (255,)),
                                         image).convert("RGB")
        return image.convert("RGB")

    def square_image(self, image: Image.Image, mode: str = "understanding", size: int | None = None) -> Image.Image:
        """`mode="understanding"` pads to a square, `"generation"` (training targets) centre-crops; then resizes to
        `size` (default `image_size`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        size = size or self.image_size
        self.check_size(size)
        image = self.to_rgb(image)
        square = self.pad_to_square(image) if mode == "understanding" else self.center_crop_square(image)
        return square.resize((size, size), resample=self.resample)

    @staticmethod
    def normalize(pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
        return np.moveaxis(pixels.astype(np.float32) / 255.0 * 2.0 - 1.0, -1, -3)

    def preprocess(self, images, mode: str = "understanding", size: int | None = None, return_tensors="pt", **kwargs):
        """images: a PIL image or a list of them -> `pixel_values` (b, 3, size, size) in [-1, 1]."""
        images = images if isinstance(images, (list, tuple)) else [images]
        squares = [np.asarray(self.square_image(image, mode, size)) for image in images]
        return BatchFeature({"pixel_values": self.normalize(np.stack(squares))}, tensor_type=return_tensors)

    @staticmethod
    def postprocess(pixels: torch.Tensor, output_type: str = "pil"):
        """Decoded pixels (b, 3, H, W), nominally in [-1, 1] -> PIL images, uint8 arrays (b, H, W, 3) or uint8 tensors."""
        as_uint8 = (127.5 * pixels.float() + 128.0).clamp(0, 255).to(torch.uint8)
        if output_type == "pt":
            return as_uint8
        array = as_uint8.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        if output_type == "pil":
            return [Image.fromarray(image) for image in array]
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")


def _is_positive_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit integer or float pixels (H, W) -> uint8, scaled from the smallest full scale that holds them:
    1 (floats only), 255, 65535, or their maximum."""
    is_float = pixels.dtype.kind == "f"
    pixels = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    largest = pixels.max(initial=0.0)
    scales = ([1.0] if is_float else []) + [255.0, 65535.0]
    full_scale = next((scale for scale in scales if largest <= scale), largest)
    return np.round(pixels * (255.0 / full_scale)).astype(np.uint8)


__all__ = ["HarmonImageProcessor"]
