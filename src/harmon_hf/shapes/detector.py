"""A deterministic detector for the shapes world: palette colour segmentation, connected regions, shape from the
region's outline, position from its bounding box. It judges generated images as GenEval's detector does real ones."""

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUND, PALETTE, RELATIONS, region_box


# A pixel belongs to a colour when that colour is its nearest of palette + background and closer than this (RGB
# distance): anti-aliased edge pixels, halfway to the background, belong to nothing.
MAX_COLOUR_DISTANCE = 90.0
MIN_AREA = 0.012  # regions smaller than this share of the canvas are specks, not objects
MAX_ASPECT = 1.6  # bounding boxes longer than this on one side are not one of the shapes
REGION_MARGIN = 0.1  # how far outside a region's box of centres a detected centre may lie


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str  # one of SHAPES, or "unknown"
    x: float  # centre of the bounding box, in fractions of the canvas
    y: float
    area: float  # share of the canvas


def _outline_templates(rows: int) -> dict[str, np.ndarray]:
    """Width of each shape across its bounding box, row by row (top to bottom), at the centres of `rows` rows."""
    t = (np.arange(rows) + 0.5) / rows
    return {"circle": 2 * np.sqrt(t * (1 - t)), "square": np.ones(rows), "triangle": t}


def classify_shape(region: np.ndarray) -> str:
    """The shape whose outline (width per row over the box) is nearest to the region's; `region` is its box mask."""
    height, width = region.shape
    if max(height / width, width / height) > MAX_ASPECT:
        return "unknown"
    widths = region.sum(axis=1) / width
    errors = {shape: np.abs(widths - template).mean() for shape, template in _outline_templates(height).items()}
    return min(errors, key=errors.get)


def _connected_regions(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, each as an array of (row, column) pixels."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            row, column = queue.popleft()
            pixels.append((row, column))
            for r, c in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    queue.append((r, c))
        regions.append(np.array(pixels))
    return regions


def detect(image: Image.Image) -> list[Detection]:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    names = list(PALETTE)
    references = np.array([BACKGROUND] + [PALETTE[name] for name in names], dtype=np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - references[None, None], axis=-1)  # (h, w, 1 + colours)
    nearest = distances.argmin(axis=-1)
    labels = np.where(distances.min(axis=-1) < MAX_COLOUR_DISTANCE, nearest, 0)  # 0: background or nothing
    detections = []
    for index, colour in enumerate(names, start=1):
        for region in _connected_regions(labels == index):
            area = len(region) / (height * width)
            if area < MIN_AREA:
                continue
            (top, left), (bottom, right) = region.min(axis=0), region.max(axis=0)
            box = np.zeros((bottom - top + 1, right - left + 1), dtype=bool)
            box[region[:, 0] - top, region[:, 1] - left] = True
            detections.append(Detection(colour, classify_shape(box), (left + right + 1) / 2 / width,
                                        (top + bottom + 1) / 2 / height, area))
    return detections


# -- judging ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """What an image must show: `count` objects of `shape` (of `colour`, when given) and no other objects; a
    `region` for a single object; or `relation` between the first and the second required object."""

    objects: tuple[tuple[str | None, str, int], ...]  # (colour or None, shape, count)
    region: str | None = None
    relation: str | None = None


def _matches(detection: Detection, colour: str | None, shape: str) -> bool:
    return detection.shape == shape and (colour is None or detection.colour == colour)


def satisfies(detections: list[Detection], requirement: Requirement) -> bool:
    wanted = sum(count for _, _, count in requirement.objects)
    if len(detections) != wanted:
        return False
    found = []
    for colour, shape, count in requirement.objects:
        matching = [d for d in detections if _matches(d, colour, shape)]
        if len(matching) != count:
            return False
        found.append(matching)
    if requirement.region is not None:
        x0, y0, x1, y1 = region_box(requirement.region)
        (detection,) = found[0]
        inside_x = x0 - REGION_MARGIN <= detection.x <= x1 + REGION_MARGIN
        inside_y = y0 - REGION_MARGIN <= detection.y <= y1 + REGION_MARGIN
        if not (inside_x and inside_y):
            return False
    if requirement.relation is not None:
        (first,), (second,) = found
        axis, sign = RELATIONS[requirement.relation]
        offset = np.array([second.x - first.x, second.y - first.y])
        # GenEval's rule: the offset points the right way along the relation's axis, more than across it.
        if not (offset[axis] * sign > 0 and abs(offset[axis]) > abs(offset[1 - axis])):
            return False
    return True


__all__ = ["Detection", "Requirement", "classify_shape", "detect", "satisfies"]
