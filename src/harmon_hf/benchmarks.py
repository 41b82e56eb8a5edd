"""The generation benchmarks of `harmon eval`: the folder layout each official scorer reads (GenEval, DPG-Bench,
WISE), the reading and checking of their prompt files, and FID between two folders of images (MJHQ-30K)."""

import csv
import dataclasses
import json
import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .user_input import first_line


# The image files `frechet_inception_distance` reads in a folder and its subfolders (MJHQ-30K's images are .jpg files
# in one folder per category).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The TorchScript translation of TensorFlow's inception-2015-12-05 graph that StyleGAN2-ADA's and StyleGAN3's metrics
# and clean-fid load: FID's reference network (the pool3 features of the original TensorFlow implementation, TTUR).
FID_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FID_IMAGE_SIZE = 299


@dataclasses.dataclass(frozen=True)
class BenchmarkPrompt:
    """One prompt of a benchmark: `text` is what is drawn, `name` names its files in the benchmark's layout, and
    `metadata` (GenEval) is written beside them as the prompts file gives it."""

    text: str
    name: str
    metadata: str | None = None


class BenchmarkLayout:
    """A benchmark's prompts file and where its official scorer expects the images of each prompt."""

    title: str  # what a prompts file of this benchmark is called in errors
    images_per_prompt: int | None  # the benchmark's own number of samples per prompt (None: no such number)

    def read_prompts(self, path: str | Path) -> list[BenchmarkPrompt]:
        """The prompts of the file (or folder) `path`, in order; a ValueError names the file, the line or entry
        and the rule of the benchmark's format that it breaks."""
        raise NotImplementedError

    def check_sampling(self, images_per_prompt: int, height: int | None, width: int | None):
        """Refuse sampling settings that the benchmark's scorer cannot read (before any model work)."""
        if images_per_prompt < 1:
            raise ValueError(f"images per prompt must be at least 1, got {images_per_prompt}")

    def image_paths(self, outdir: Path, prompt: BenchmarkPrompt, images_per_prompt: int) -> list[Path]:
        """The image files of `prompt`."""
        raise NotImplementedError

    def is_done(self, outdir: Path, prompt: BenchmarkPrompt, images_per_prompt: int) -> bool:
        """Whether every image file of `prompt` is there and whole."""
        return all(is_whole_image(path) for path in self.image_paths(outdir, prompt, images_per_prompt))

    def arrange(self, samples: list[Image.Image]) -> list[Image.Image]:
        """The images written to `image_paths`, made from the prompt's samples."""
        return samples

    def metadata_path(self, outdir: Path, prompt: BenchmarkPrompt) -> Path | None:
        """Where `prompt.metadata` goes, for a layout that keeps it."""
        return None


def is_whole_image(path: Path) -> bool:
    """Whether `path` is an image file that reads to its end: a file cut short (a full disk, a stopped copy) is not."""
    try:
        with Image.open(path) as image:
            image.verify()  # every chunk and its checksum, to the end of the file; it decodes no pixels
        with Image.open(path) as image:
            image.load()  # the pixels
    except (OSError, SyntaxError, Image.DecompressionBombError):  # PIL's damaged PNG chunk is a SyntaxError
        return False
    return True


def _read_text(path: str | Path, title: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"no such file: {path}")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not {title}: it is not UTF-8 text ({error.reason})") from error


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class GenEvalLayout(BenchmarkLayout):
    """GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval). Input: `prompts/evaluation_metadata.jsonl`, one
    JSON object per line: "tag" (the task: single_object, two_object, counting, colors, position, color_attr),
    "include" (a list of {"class", "count"} objects, some with "color" or "position"), optional "exclude" and the
    "prompt". Output, as `evaluation/evaluate_images.py` reads it: OUTDIR/<index:05d>/metadata.jsonl (the line)
    and OUTDIR/<index:05d>/samples/<n:04d>.png; 4 samples per prompt, as `generation/diffusers_generate.py`
    draws (its optional grid.png is not made)."""

    title = "GenEval metadata"
    images_per_prompt = 4

    def read_prompts(self, path: str | Path) -> list[BenchmarkPrompt]:
        prompts = []
        for number, line in enumerate(_read_text(path, self.title).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not {self.title}: line {number} is not JSON ({error.msg})") from error
            broken_rule = self.broken_rule(entry)
            if broken_rule is not None:
                raise ValueError(f"{path} is not {self.title}: line {number} {broken_rule}")
            prompts.append(BenchmarkPrompt(text=entry["prompt"], name=f"{len(prompts):05d}", metadata=line.strip()))
        if not prompts:
            raise ValueError(f"{path} is not {self.title}: it holds no prompt")
        return prompts

    def broken_rule(self, entry) -> str | None:
        """What is wrong with one line's object (GenEval's scorer reads "tag", "include" and "exclude"), or None."""
        if not isinstance(entry, dict):
            return "is not a JSON object"
        for key in ("prompt", "tag"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                return f'has no "{key}" string'
        for key in ("include", "exclude"):
            if key == "include" or key in entry:
                clauses = entry.get(key)
                if not isinstance(clauses, list) or not all(
                    isinstance(clause, dict) and isinstance(clause.get("class"), str) and _is_count(clause.get("count"))
                    for clause in clauses
                ):
                    return f'has no "{key}" list of {{"class": name, "count": number}} objects'
        return None

    def image_paths(self, outdir: Path, prompt: BenchmarkPrompt, images_per_prompt: int) -> list[Path]:
        return [outdir / prompt.name / "samples" / f"{sample:04d}.png" for sample in range(images_per_prompt)]

    def metadata_path(self, outdir: Path, prompt: BenchmarkPrompt) -> Path:
        return outdir / prompt.name / "metadata.jsonl"


class PromptsFileLayout(GenEvalLayout):
    """`harmon generate --prompts`: any JSON-lines file of objects with a "prompt", written in GenEval's layout
    (with as many samples as `harmon generate --n` asks, 1 by default)."""

    title = "a prompts file"
    images_per_prompt = None

    def broken_rule(self, entry) -> str | None:
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            return 'is not an object with a "prompt" string'
        return None


def dpg_grid(samples: list[Image.Image]) -> Image.Image:
    """Four samples of size r x r as one 2r x 2r image, in the order `compute_dpg_bench.py` cuts its tiles: sample 0
    top left, 1 top right, 2 bottom left, 3 bottom right."""
    width, height = samples[0].size
    grid = Image.new("RGB", (2 * width, 2 * height))
    for index, sample in enumerate(samples):
        grid.paste(sample, ((index % 2) * width, (index // 2) * height))
    return grid


class DPGBenchLayout(BenchmarkLayout):
    """DPG-Bench (Hu et al. 2024, github.com/TencentQQGYLab/ELLA, dpg_bench/). Input: its prompts folder (one
    `<item_id>.txt` per prompt) or `dpg_bench.csv` (columns item_id, text, keywords, proposition_id, dependency,
    category_broad, category_detailed, tuple, question_natural_language: one row per question, so several rows per
    item_id with the same text). Output: OUTDIR/<item_id>.png, one image per prompt holding 4 samples in a 2 x 2 grid,
    which `compute_dpg_bench.py --resolution R --pic-num 4` cuts into 4 square tiles of R pixels (R: the sample size),
    looking each image up by its name up to the first '.'. With one sample per prompt the image is that sample
    (`--pic-num 1`). Both inputs give the prompts in the order of their item_id, so they give the same images."""

    title = "DPG-Bench prompts"
    images_per_prompt = 4

    def read_prompts(self, path: str | Path) -> list[BenchmarkPrompt]:
        path = Path(path)
        if path.is_dir():
            texts = self._read_folder(path)
        elif path.is_file():
            texts = self._read_csv(path)
        else:
            raise ValueError(f"no such file or folder: {path}")
        return [BenchmarkPrompt(text=texts[item_id], name=item_id) for item_id in sorted(texts)]

    @staticmethod
    def _check_item_id(item_id: str, where: str):
        if not item_id or item_id != Path(item_id).name or "." in item_id:
            raise ValueError(f"{where}: item_id {item_id!r} is not a file name without '.' (the scorer looks each "
                             "image up by its name up to the first '.')")

    def _read_folder(self, folder: Path) -> dict[str, str]:
        texts = {}
        for file in sorted(folder.glob("*.txt")):
            self._check_item_id(file.stem, f"{folder} is not DPG-Bench's prompts folder")
            texts[file.stem] = _read_text(file, "a DPG-Bench prompt").strip()
            if not texts[file.stem]:
                raise ValueError(f"{file} is not a DPG-Bench prompt: it is empty")
        if not texts:
            raise ValueError(f"{folder} is not DPG-Bench's prompts folder: it holds no <item_id>.txt file")
        return texts

    def _read_csv(self, path: Path) -> dict[str, str]:
        texts, first_lines = {}, {}
        reader = csv.DictReader(_read_text(path, "dpg_bench.csv").splitlines(keepends=True))
        if reader.fieldnames is None or not {"item_id", "text"} <= set(reader.fieldnames):
            raise ValueError(f'{path} is not dpg_bench.csv: it has no "item_id" and "text" columns')
        for row in reader:
            where = f"{path} is not dpg_bench.csv: line {reader.line_num}"
            item_id, text = (row["item_id"] or "").strip(), (row["text"] or "").strip()
            self._check_item_id(item_id, where)
            if not text:
                raise ValueError(f"{where} has no text")
            if texts.setdefault(item_id, text) != text:
                raise ValueError(f"{where} gives item {item_id} another text than line {first_lines[item_id]}")
            first_lines.setdefault(item_id, reader.line_num)
        if not texts:
            raise ValueError(f"{path} is not dpg_bench.csv: it holds no prompt")
        return texts

    def check_sampling(self, images_per_prompt: int, height: int | None, width: int | None):
        if images_per_prompt not in (1, 4):
            raise ValueError(f"DPG-Bench takes 4 images per prompt (a 2x2 grid, --pic-num 4) or 1, got "
                             f"{images_per_prompt}")
        if height is not None and height != width:
            raise ValueError(f"DPG-Bench's scorer cuts square tiles: give a square size, got {height}x{width}")

    def image_paths(self, outdir: Path, prompt: BenchmarkPrompt, images_per_prompt: int) -> list[Path]:
        return [outdir / f"{prompt.name}.png"]

    def arrange(self, samples: list[Image.Image]) -> list[Image.Image]:
        return samples if len(samples) == 1 else [dpg_grid(samples)]


class WISELayout(BenchmarkLayout):
    """WISE (Niu et al. 2025, github.com/PKU-YuanGroup/WISE). Input: one of its prompt files (WISE_Verified's
    `data_verified/*.json`, `data_verified/merge.json` for all 1000, or the original release's
    `WISE_legacy/data/*.json`): a JSON list of objects with "prompt_id" (an integer) and "Prompt", besides
    "Explanation", "Category" and "Subcategory". Output: OUTDIR/<prompt_id>.png, one image per prompt, where
    `vllm_eval.py` and the original `gpt_eval.py` look for it (`--image_dir OUTDIR`)."""

    title = "a WISE prompts file"
    images_per_prompt = 1

    def read_prompts(self, path: str | Path) -> list[BenchmarkPrompt]:
        try:
            entries = json.loads(_read_text(path, self.title))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not {self.title}: not JSON ({error.msg}, line {error.lineno})") from error
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path} is not {self.title}: it is not a non-empty JSON list of prompts")
        prompts, seen = [], set()
        for number, entry in enumerate(entries, start=1):
            if not isinstance(entry, dict):
                raise ValueError(f"{path} is not {self.title}: entry {number} is not a JSON object")
            prompt_id = entry.get("prompt_id")
            if not isinstance(prompt_id, int) or isinstance(prompt_id, bool):
                raise ValueError(f'{path} is not {self.title}: entry {number} has no "prompt_id" integer')
            if not isinstance(entry.get("Prompt"), str) or not entry["Prompt"].strip():
                raise ValueError(f'{path} is not {self.title}: entry {number} has no "Prompt" string')
            if prompt_id in seen:
                raise ValueError(f"{path} is not {self.title}: entry {number} repeats prompt_id {prompt_id}")
            seen.add(prompt_id)
            prompts.append(BenchmarkPrompt(text=entry["Prompt"], name=str(prompt_id)))
        return prompts

    def check_sampling(self, images_per_prompt: int, height: int | None, width: int | None):
        if images_per_prompt != 1:
            raise ValueError(f"WISE scores one image per prompt (<prompt_id>.png), got {images_per_prompt}")

    def image_paths(self, outdir: Path, prompt: BenchmarkPrompt, images_per_prompt: int) -> list[Path]:
        return [outdir / f"{prompt.name}.png"]


BENCHMARK_LAYOUTS = {"geneval": GenEvalLayout(), "dpg": DPGBenchLayout(), "wise": WISELayout()}
PROMPTS_FILE_LAYOUT = PromptsFileLayout()


def machine_description(device: torch.device) -> dict:
    """What a timing was measured on: the CPU's model name and the instruction set torch's CPU kernels use, and the
    GPU's name when `device` is one."""
    description = {"cpu": _cpu_model_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


# -- FID ------------------------------------------------------------------------------------------------------------


class FIDInceptionV3(torch.nn.Module):
    """FID's reference feature extractor: TensorFlow's Inception v3 of 2015-12-05, its 2048 pool3 features, as the
    TorchScript file `FID_INCEPTION_URL` (the network clean-fid, torch-fidelity and pytorch-fid port). Without
    `path` the file is downloaded once into torch's hub cache ($TORCH_HOME/hub/checkpoints/inception-2015-12-05.pt,
    by default ~/.cache/torch/hub/checkpoints/).

    Input: (N, 3, 299, 299) float pixel values in [0, 255]. Output: (N, 2048).
    """

    num_features = 2048  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        if path is None:
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(FID_INCEPTION_URL).name
            if not path.is_file():
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(FID_INCEPTION_URL, str(path))  # to a temporary file, then renamed
                except OSError as error:  # URLError is one
                    raise ValueError(
                        f"cannot download FID's Inception network {FID_INCEPTION_URL} ({error}); fetch it elsewhere "
                        "and give its path (harmon eval fid --inception FILE)"
                    ) from error
        if not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
        try:
            # TorchScript's own reader: it runs no Python code from the file, as torch.load(weights_only=True).
            self.network = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"cannot load {path} as a TorchScript file: {first_line(error)}") from error

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # As clean-fid's InceptionV3W on images it resized itself: the network's layers on (x - 128) / 128, which
        # skips the bilinear resize that its forward would apply.
        return self.network.layers((pixels - 128) / 128).reshape(len(pixels), -1)


def image_files(folder: str | Path) -> list[Path]:
    """The images in `folder` and its subfolders, sorted; a missing folder or one without images is a ValueError."""
    if not Path(folder).is_dir():
        raise ValueError(f"no such image folder: {folder}")
    files = sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def fid_pixels(path: Path) -> torch.Tensor:
    """(3, 299, 299) float32 values in [0, 255]: the image resized as clean-fid's "clean" mode does, bicubic with
    PIL on each channel as floats, not rounded to uint8 after resizing."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not an image: {path} ({error})") from error
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., channel])).resize(
            (FID_IMAGE_SIZE, FID_IMAGE_SIZE), Image.Resampling.BICUBIC))
        for channel in range(3)
    ]
    return torch.from_numpy(np.stack(channels).clip(0, 255))


@torch.no_grad()
def frechet_inception_distance(real: str | Path, generated: str | Path,
                               feature_extractor: torch.nn.Module | None = None, batch_size: int = 50,
                               device: str | torch.device = "cpu") -> dict:
    """FID between the images of the folders `real` and `generated` (and their subfolders), by torchmetrics'
    `FrechetInceptionDistance`.

    MJHQ-30K's authors (Playground v2.5's model card) compute its FID "at resolution 1024x1024" and name no
    implementation; the images are brought to the Inception's 299 x 299 here as clean-fid's default ("clean") mode
    does (PIL bicubic, float values), and the features are `FIDInceptionV3`'s, as in clean-fid, torch-fidelity and
    pytorch-fid.

    Args:
        real, generated: folders of images (.png, .jpg, .jpeg, .webp, .bmp), at least 2 in each.
        feature_extractor: takes (N, 3, 299, 299) float pixel values in [0, 255] and returns (N, d) features
            (torchmetrics reads d from its `num_features` or from one call); None: `FIDInceptionV3()`.
        batch_size: images per forward pass.
        device: where the features are computed.

    Returns:
        {"fid": the distance, "real_images": count, "generated_images": count}.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    folders = {True: image_files(real), False: image_files(generated)}  # before any download
    for is_real, files in folders.items():
        if len(files) < 2:
            raise ValueError(f"FID needs at least 2 images in each folder; {real if is_real else generated} has "
                             f"{len(files)}")
    if feature_extractor is None:
        feature_extractor = FIDInceptionV3()
    # normalize=True: torchmetrics probes a feature extractor without `num_features` with a float image, as ours.
    metric = FrechetInceptionDistance(feature=feature_extractor, normalize=True,
                                      input_img_size=(3, FID_IMAGE_SIZE, FID_IMAGE_SIZE)).to(device)
    for is_real, files in folders.items():
        for start in range(0, len(files), batch_size):
            batch = torch.stack([fid_pixels(path) for path in files[start : start + batch_size]])
            metric.update(batch.to(device), real=is_real)
    return {"fid": float(metric.compute()), "real_images": len(folders[True]),
            "generated_images": len(folders[False])}
