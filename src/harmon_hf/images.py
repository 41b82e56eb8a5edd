"""Reading a user's image file, for every entry point that takes one (the `harmon` command, the demo): its size is
checked from the header before it is decoded, and what cannot be read is a one-line ValueError."""

from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def opened_image(source: "str | Path | BinaryIO", name: str | None = None):
    """The image file `source` (a path or a binary file), opened but not decoded, once the processor's limits
    (`HarmonImageProcessor.check_image_size`) hold for the size its header declares: a small file can declare a huge
    image. Anything that cannot be read, or that exceeds them, is a one-line ValueError that `name` (e.g. the file's
    path) starts."""
    from PIL import Image

    from .modeling.image_processing_harmon import MAX_IMAGE_SIDE, HarmonImageProcessor

    prefix = f"{name}: " if name else ""
    try:
        with Image.open(source) as image:
            HarmonImageProcessor.check_image_size(*image.size)
            yield image
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{prefix}the image declares more pixels than are ever decoded here (its longer side may be "
                         f"at most {MAX_IMAGE_SIDE})") from None
    except OSError as error:  # UnidentifiedImageError and truncated files are OSErrors
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{prefix}not an image that can be read ({reason})") from None


def open_image(source: "str | Path | BinaryIO", name: str | None = None):
    """The image file `source` (see `opened_image`) as an 8-bit RGB PIL image, turned upright as its EXIF
    orientation says; its mode is converted by `HarmonImageProcessor.to_rgb` (16-bit and float pixels scaled,
    transparency over white)."""
    from PIL import ImageOps

    from .modeling.image_processing_harmon import HarmonImageProcessor

    with opened_image(source, name) as image:
        return HarmonImageProcessor.to_rgb(ImageOps.exif_transpose(image))
