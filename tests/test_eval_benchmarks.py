"""`harmon eval geneval|dpg|wise|fid`: the images in the layouts the official scorers read, resumable and sharded,
and FID between two folders."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_harmon
from harmon_hf.benchmarks import DPGBenchLayout, FIDInceptionV3, frechet_inception_distance

FAST = ["--size", "32", "--rounds", "2", "--steps", "2"]
# One thread, as `accelerate launch` gives each CPU process: sums split over threads round differently.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Lines of GenEval's prompts/evaluation_metadata.jsonl, as they are written there.
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "orange", "count": 3}], "exclude": [{"class": "orange", "count": 4}], '
    '"prompt": "a photo of three oranges"}',
    '{"tag": "position", "include": [{"class": "sink", "count": 1}, {"class": "tie", "count": 1, "position": '
    '["above", 0]}], "prompt": "a photo of a tie above a sink"}',
]
PROMPTS = [json.loads(line)["prompt"] for line in GENEVAL_LINES]


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


def harmon_eval(benchmark, prompts, outdir, model, *arguments):
    return run_harmon("eval", benchmark, "--prompts", prompts, "--outdir", outdir, "--model", model, *FAST,
                      *arguments, env=ONE_THREAD)


def files_under(folder) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def geneval_run(harmon_folder, tmp_path_factory):
    """`harmon eval geneval` on three lines of GenEval's metadata, 4 samples each (the default)."""
    folder = tmp_path_factory.mktemp("geneval")
    (folder / "evaluation_metadata.jsonl").write_text("".join(line + "\n" for line in GENEVAL_LINES))
    result = harmon_eval("geneval", folder / "evaluation_metadata.jsonl", folder / "out", harmon_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_geneval_writes_its_layout_and_a_run_record(geneval_run):
    out = geneval_run / "out"
    names = ["metadata.jsonl"] + [f"samples/{sample:04d}.png" for sample in range(4)]
    assert files_under(out) == {"run.json"} | {f"{index:05d}/{name}" for index in range(3) for name in names}
    for index, line in enumerate(GENEVAL_LINES):
        assert (out / f"{index:05d}" / "metadata.jsonl").read_text() == line + "\n"  # the line as given
        with Image.open(out / f"{index:05d}" / "samples" / "0003.png") as image:
            assert image.format == "PNG" and image.size == (32, 32)
    record = json.loads((out / "run.json").read_text())
    assert record["benchmark"] == "geneval" and record["prompts"] == 3 and record["images_per_prompt"] == 4
    assert record["images"] == record["generated_images"] == 12 and record["processes"] == 1
    assert record["sampling"]["num_iter"] == 2 and record["sampling"]["num_inference_steps"] == 2
    assert (record["sampling"]["height"], record["sampling"]["width"]) == (32, 32)
    assert record["sampling"]["preset_name"] == "reference" and record["sampling"]["dtype"] == "float32"
    assert record["seconds_per_image"] > 0 and record["torch"] == torch.__version__
    assert record["machine"]["cpu"] and record["machine"]["torch_cpu_capability"]


def test_a_second_run_redraws_only_the_unfinished_prompt(geneval_run, harmon_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(geneval_run / "out", out)
    times = {name: (out / name).stat().st_mtime_ns for name in files_under(out)}
    missing = out / "00001" / "samples" / "0002.png"
    expected = missing.read_bytes()
    missing.unlink()
    result = harmon_eval("geneval", geneval_run / "evaluation_metadata.jsonl", out, harmon_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert missing.read_bytes() == expected
    untouched = [name for name in times if name.startswith(("00000/", "00002/"))]
    assert len(untouched) == 10 and all((out / name).stat().st_mtime_ns == times[name] for name in untouched)
    assert json.loads((out / "run.json").read_text())["generated_images"] == 4


def test_dpg_tiles_the_samples_as_its_scorer_cuts_them_and_shards(geneval_run, harmon_folder, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for index, text in enumerate(PROMPTS):  # item ids in the order of GenEval's lines: the same seeds
        (prompts / f"item{index}.txt").write_text(text + "\n" * index)
    single = tmp_path / "single"
    result = harmon_eval("dpg", prompts, single, harmon_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(single) == {"run.json", "item0.png", "item1.png", "item2.png"}
    for index in range(3):
        with Image.open(single / f"item{index}.png") as grid:
            assert grid.size == (64, 64)
            # compute_dpg_bench.py's crops with --resolution 32: (0,0), (32,0), (0,32), (32,32)
            for sample, corner in enumerate([(0, 0), (32, 0), (0, 32), (32, 32)]):
                tile = np.asarray(grid.crop((*corner, corner[0] + 32, corner[1] + 32)))
                with Image.open(geneval_run / "out" / f"{index:05d}" / "samples" / f"{sample:04d}.png") as expected:
                    assert np.array_equal(tile, np.asarray(expected)), (index, sample)

    sharded = tmp_path / "sharded"
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
         "harmon_hf.cli", "eval", "dpg", "--prompts", str(prompts), "--outdir", str(sharded), "--model",
         str(harmon_folder), *FAST],
        capture_output=True, text=True, timeout=300,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert files_under(sharded) == files_under(single)
    for index in range(3):
        assert (sharded / f"item{index}.png").read_bytes() == (single / f"item{index}.png").read_bytes()
    record = json.loads((sharded / "run.json").read_text())
    assert record["processes"] == 2 and record["generated_images"] == 12 and record["benchmark"] == "dpg"


def test_dpg_reads_its_csv_as_its_prompts_folder(tmp_path):
    """dpg_bench.csv has one row per question, several per item_id; both inputs give the prompts by item_id."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "partiprompts2.txt").write_text("A red truck.")
    (folder / "COCOval7.txt").write_text("Two cats, one asleep.\n")
    header = "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple," \
             "question_natural_language\n"
    rows = ['partiprompts2,A red truck.,truck,1,0,entity,whole,entity - whole (truck),Is there a truck?\n',
            'partiprompts2,A red truck.,red,2,1,attribute,color,"attribute - color (truck, red)",Is the truck red?\n',
            'COCOval7,"Two cats, one asleep.",cat,1,0,entity,whole,entity - whole (cat),Are there cats?\n']
    (tmp_path / "dpg_bench.csv").write_text(header + "".join(rows))
    layout = DPGBenchLayout()
    from_folder = layout.read_prompts(folder)
    assert [(prompt.name, prompt.text) for prompt in from_folder] == [
        ("COCOval7", "Two cats, one asleep."), ("partiprompts2", "A red truck.")]
    assert layout.read_prompts(tmp_path / "dpg_bench.csv") == from_folder
    (tmp_path / "dpg_bench.csv").write_text(header + "".join(rows) + rows[0].replace("A red truck.", "A truck."))
    with pytest.raises(ValueError, match="dpg_bench.csv: line 5 gives item partiprompts2 another text than line 2"):
        layout.read_prompts(tmp_path / "dpg_bench.csv")


def test_wise_writes_one_image_per_prompt_id(harmon_folder, tmp_path):
    entries = [{"Prompt": text, "Explanation": "-", "Category": "Biology", "Subcategory": "State", "prompt_id": number}
               for text, number in zip(PROMPTS, (701, 3, 1000))]
    (tmp_path / "natural_science.json").write_text(json.dumps(entries, indent=4))
    result = harmon_eval("wise", tmp_path / "natural_science.json", tmp_path / "out", harmon_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(tmp_path / "out") == {"run.json", "701.png", "3.png", "1000.png"}
    with Image.open(tmp_path / "out" / "1000.png") as image:
        assert image.size == (32, 32)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["images"] == record["generated_images"] == 3 and record["images_per_prompt"] == 1


class MeanColours(torch.nn.Module):
    """A stand-in for the Inception network: the mean colour of each quarter of the image, 12 features."""

    def forward(self, pixels):
        return torch.nn.functional.adaptive_avg_pool2d(pixels / 255, 2).flatten(1)


def _image_folder(folder, pixels):
    folder.mkdir(parents=True)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return folder


def test_fid_is_zero_for_the_same_images_and_grows_with_a_shift(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 170, (16, 24, 24, 3), dtype=np.uint8)
    real = _image_folder(tmp_path / "real", pixels)
    same = _image_folder(tmp_path / "same" / "samples", pixels).parent  # in a subfolder, beside other files
    (same / "run.json").write_text("{}")
    shifted = _image_folder(tmp_path / "shifted", pixels + 60)
    result = frechet_inception_distance(real, same, feature_extractor=MeanColours(), batch_size=5)
    assert result["real_images"] == result["generated_images"] == 16
    assert abs(result["fid"]) < 1e-6
    # the features move by 60/255 each: the means alone are 12 * (60/255)^2 = 0.66 apart
    assert frechet_inception_distance(real, shifted, feature_extractor=MeanColours())["fid"] > 0.5


@pytest.mark.parametrize("real, generated, message", [
    ("missing", "real", "no such image folder: .*missing"),
    ("empty", "real", "empty holds no images"),
    ("real", "one", "FID needs at least 2 images in each folder; .*one has 1"),
])
def test_fid_refuses_folders_without_images(tmp_path, real, generated, message):
    _image_folder(tmp_path / "real", np.zeros((3, 8, 8, 3), dtype=np.uint8))
    _image_folder(tmp_path / "one", np.zeros((1, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=message):
        frechet_inception_distance(tmp_path / real, tmp_path / generated, feature_extractor=MeanColours())


def test_the_inception_file_gets_pixels_as_clean_fid_gives_them(tmp_path):
    """The TorchScript network's layers take (x - 128) / 128 of the resized [0, 255] pixels."""

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, pixels):
            return self.layers(pixels)

    torch.jit.save(torch.jit.script(Network()), tmp_path / "inception.pt")
    extractor = FIDInceptionV3(tmp_path / "inception.pt")
    pixels = torch.stack([torch.full((3, 299, 299), 128.0), torch.full((3, 299, 299), 255.0)])
    assert torch.allclose(extractor(pixels), torch.tensor([[0.0] * 3, [127 / 128] * 3]))


@pytest.mark.parametrize("arguments, fragment", [
    (["eval", "mjhq"], "argument BENCHMARK: invalid choice: 'mjhq'"),
    (["eval", "geneval", "--prompts", "no_tag.jsonl"], 'no_tag.jsonl is not GenEval metadata: line 2 has no "tag"'),
    (["eval", "geneval", "--prompts", "prompts.txt"], "prompts.txt is not GenEval metadata: line 1 is not JSON"),
    (["eval", "dpg", "--prompts", "other.csv"], 'other.csv is not dpg_bench.csv: it has no "item_id" and "text"'),
    (["eval", "dpg", "--prompts", "prompts", "--n", "3"], "DPG-Bench takes 4 images per prompt (a 2x2 grid"),
    (["eval", "dpg", "--prompts", "prompts", "--size", "32x64"], "give a square size, got 32x64"),
    (["eval", "wise", "--prompts", "wise.json"], 'wise.json is not a WISE prompts file: entry 2 has no "prompt_id"'),
    (["eval", "wise", "--prompts", "wise_ok.json", "--n", "4"], "WISE scores one image per prompt"),
    (["eval", "fid", "--real", "missing", "--generated", "prompts"], "no such image folder: missing"),
    (["eval", "fid", "--real", "prompts", "--generated", "prompts", "--inception", "prompts.txt"],
     "cannot load prompts.txt as a TorchScript file"),
])
def test_bad_input_exits_with_one_line(harmon_folder, tmp_path, monkeypatch, arguments, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_tag.jsonl").write_text(GENEVAL_LINES[0] + '\n{"prompt": "a cat", "include": []}\n')
    (tmp_path / "prompts.txt").write_text("a photo of a bench\n")
    (tmp_path / "other.csv").write_text("id,prompt\n1,a cat\n")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "item0.txt").write_text("a cat")
    (tmp_path / "wise.json").write_text(json.dumps([{"Prompt": "a cat", "prompt_id": 1}, {"Prompt": "a dog"}]))
    (tmp_path / "wise_ok.json").write_text(json.dumps([{"Prompt": "a cat", "prompt_id": 1}]))
    if arguments[1] != "fid" and len(arguments) > 2:
        arguments = [*arguments, "--outdir", "out", "--model", str(harmon_folder)]
    assert_one_line_error(run_harmon(*arguments), fragment)
    assert not (tmp_path / "out").exists()
