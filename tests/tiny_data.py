"""Tiny training datasets written to disk in the formats users bring: parquet, JSON lines + image folder, text."""

import json
from pathlib import Path

from datasets import Dataset, Image as ImageFeature
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def colour_image(name: str, size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(COLORS[name], (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return image


def caption_rows(count: int) -> list[tuple[str, Image.Image]]:
    names = list(COLORS)
    return [(f"a {names[i % 4]} square", colour_image(names[i % 4])) for i in range(count)]


def write_caption_parquet(path: Path, count: int = 32, extra: list[tuple] = ()) -> Path:
    rows = list(extra) + caption_rows(count)  # unusual rows first, where a short read meets them
    dataset = Dataset.from_dict({"text": [t for t, _ in rows], "image": [i for _, i in rows]})
    dataset.cast_column("image", ImageFeature()).to_parquet(str(path))
    return path


def write_conversation_jsonl(folder: Path, count: int = 32, broken_image: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (caption, image) in enumerate(caption_rows(count)):
        image.save(folder / f"{index}.png")
        colour = caption.split()[1]
        lines.append({"image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": colour}]})
    if broken_image:
        (folder / "broken.png").write_bytes((folder / "0.png").read_bytes()[:60])  # truncated PNG
        lines.insert(1, {"image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_text_jsonl(path: Path, count: int = 32) -> Path:
    lines = [{"text": f"The {name} square is on a white background."} for name in list(COLORS) * (count // 4)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
