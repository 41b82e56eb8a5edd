"""What the `harmon` command leaves on disk: files other users may read as the umask allows, benchmark folders that a
rerun completes (the run record, images cut short), and no half-written folder or traceback when the disk is full."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from PIL import Image

from conftest import GOLDEN
from harmon_hf.cli import atomic_save, atomic_write_text, main
from harmon_hf.convert import convert

FAST = ["--size", "32", "--rounds", "2", "--steps", "2"]
NO_ROOM = "the disk is full or a file size limit was reached (File too large)"


def mode(path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def umask():
    """`os.umask`, to set the process's umask in a test; it is restored after it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_images_and_records_get_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    atomic_save(Image.new("RGB", (8, 8)), tmp_path / "samples" / "0000.png")
    atomic_write_text("{}\n", tmp_path / "run.json")
    assert mode(tmp_path / "samples" / "0000.png") == mode(tmp_path / "run.json") == 0o666 & ~mask
    assert mode(tmp_path / "samples") == 0o777 & ~mask


def test_a_converted_folder_gets_the_modes_of_the_umask(tmp_path, umask):
    umask(0o027)
    convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path / "model")
    assert mode(tmp_path / "model") == 0o750
    files = list((tmp_path / "model").iterdir())
    assert "model.safetensors" in {file.name for file in files}  # safetensors writes 0600 files
    assert {file.name: mode(file) for file in files} == {file.name: 0o640 for file in files}


def test_a_conversion_into_an_earlier_ones_folder_replaces_its_weights_and_keeps_other_files(tmp_path):
    from safetensors import safe_open

    convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json", output=tmp_path,
            dtype="bfloat16", max_shard_size="1MB")
    # the earlier single file would be loaded before the new shards
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert {path.name for path in tmp_path.glob("model-*.safetensors")} == shards
    with safe_open(tmp_path / min(shards), "pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.bfloat16"}
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]


# -- rerunning a benchmark ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wise_run(harmon_folder, tmp_path_factory):
    """`harmon eval wise` on three prompts, run in this process."""
    folder = tmp_path_factory.mktemp("wise")
    entries = [{"Prompt": text, "prompt_id": number} for number, text in enumerate(["a cat", "a dog", "a cow"])]
    (folder / "wise.json").write_text(json.dumps(entries))
    assert wise(folder, folder / "out", harmon_folder) == 0
    return folder


def wise(folder, outdir, model) -> int:
    return main(["eval", "wise", "--prompts", str(folder / "wise.json"), "--outdir", str(outdir), "--model", str(model),
                 *FAST])


def times(folder) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def test_a_rerun_writes_the_missing_run_record_and_draws_nothing(wise_run, harmon_folder, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(wise_run / "out", out)
    (out / "run.json").unlink()  # stopped after the last image, before its record
    images = times(out)
    assert wise(wise_run, out, harmon_folder) == 0
    assert {name: time for name, time in times(out).items() if name != "run.json"} == images
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == record["images"] == 3 and record["generated_images"] == 0
    assert record["seconds_per_image"] is None and record["sampling"]["num_iter"] == 2
    assert record["sampling"]["height"] == 32 and record["sampling"]["preset_name"] == "reference"
    assert f"wrote the missing {out / 'run.json'}" in capsys.readouterr().out


def test_a_rerun_draws_again_only_the_image_cut_short(wise_run, harmon_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(wise_run / "out", out)
    cut = out / "1.png"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) - 40])  # the end of the pixels and the closing chunk are missing
    others = {name: time for name, time in times(out).items() if name in ("0.png", "2.png")}
    assert wise(wise_run, out, harmon_folder) == 0
    assert cut.read_bytes() == whole
    with Image.open(cut) as image:
        image.load()
    assert {name: time for name, time in times(out).items() if name in others} == others
    assert json.loads((out / "run.json").read_text())["generated_images"] == 1


# -- no room on the disk --------------------------------------------------------------------------------------------


def run_with_file_size_limit(limit: int, *arguments, cwd):
    """`harmon ARGUMENTS` in a process that may write no file beyond `limit` bytes (`ulimit -f`), its writes failing
    with EFBIG as on a full disk (SIGXFSZ would kill it instead)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "harmon_hf.cli", *map(str, arguments)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, preexec_fn=limit_file_size)


def assert_error_line(result, line):
    """The run failed with `line` as its last line on stderr (above it only progress bars), without a traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == line
    assert sum("error" in part for part in result.stderr.splitlines()) == 1, result.stderr


def contents(folder) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() if path.is_file() else None
            for path in folder.rglob("*")}


@pytest.mark.parametrize("earlier", [False, True], ids=["new-folder", "over-an-earlier-conversion"])
def test_convert_on_a_full_disk_is_one_line_and_leaves_no_partial_model(tiny_folder, tmp_path, earlier):
    if earlier:
        shutil.copytree(tiny_folder, tmp_path / "model")
    before = contents(tmp_path)
    # 100 kB: config.json fits, the weights (3.6 MB) do not
    result = run_with_file_size_limit(100_000, "convert", "--checkpoint", GOLDEN / "harmon_tiny.pth", "--vae",
                                      GOLDEN / "kl_tiny.ckpt", "--config", GOLDEN / "config.json", "--output",
                                      "model", cwd=tmp_path)
    assert_error_line(result, f"harmon convert: error: cannot write model: {NO_ROOM}")
    assert contents(tmp_path) == before  # no folder, no partial one beside it, an earlier model untouched


@pytest.mark.parametrize("command, written", [
    (["generate", "a cat", "-o", "out/cat.png"], "out/cat.png"),
    (["eval", "geneval", "--prompts", "geneval.jsonl", "--outdir", "out"], "out/00000/samples/0000.png"),
], ids=["generate", "eval-geneval"])
def test_generating_on_a_full_disk_is_one_line(harmon_folder, tmp_path, command, written):
    (tmp_path / "geneval.jsonl").write_text(json.dumps({"prompt": "a cat", "tag": "single_object",
                                                        "include": [{"class": "cat", "count": 1}]}) + "\n")
    # 1 kB: GenEval's metadata.jsonl fits, a 32 x 32 PNG of noise does not
    result = run_with_file_size_limit(1000, *command, "--model", harmon_folder, *FAST, cwd=tmp_path)
    assert_error_line(result, f"harmon {command[0]}: error: cannot write {written}: {NO_ROOM}")
    assert not [path for path in (tmp_path / "out").rglob("*") if path.suffix != ".jsonl" and path.is_file()]
