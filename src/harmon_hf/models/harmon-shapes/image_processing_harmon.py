"""Image processor of Harmon: pixels in [-1, 1] at a side that is a multiple of the VAE stride."""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


# Understanding images are padded to a square with this colour before resizing, as in training.
PAD_COLOR = (127, 127, 127)
MODES = ("understanding", "generation")


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
        self.image_size = image_size
        self.vae_stride = vae_stride
        self.resample = resample
        self.check_size(image_size)

    def check_size(self, size: int):
        if size <= 0 or size % self.vae_stride:
            raise ValueError(f"image size must be a positive multiple of {self.vae_stride}, got {size}")

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

    def square_image(self, image: Image.Image, mode: str = "understanding", size: int | None = None) -> Image.Image:
        """`mode="understanding"` pads to a square, `"generation"` (training targets) centre-crops; then resizes to
        `size` (default `image_size`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(image, Image.Image):
            raise ValueError(f"images must be PIL images, got {type(image).__name__}")
        size = size or self.image_size
        self.check_size(size)
        image = image.convert("RGB")
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


__all__ = ["HarmonImageProcessor"]
