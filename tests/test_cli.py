"""The `harmon` command, run as users run it: a real subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_harmon

FAST = ["--rounds", "3", "--steps", "4"]


harmon = run_harmon


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


def test_generate_writes_a_png_of_the_asked_size(harmon_folder, tmp_path):
    result = harmon("generate", "a red circle", "-o", tmp_path / "out.png", "--model", harmon_folder,
                    "--size", "32x64", "--seed", "3", *FAST)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.png") as image:
        assert image.format == "PNG" and image.size == (64, 32)
    again = harmon("generate", "a red circle", "-o", tmp_path / "again.png", "--size", "32x64", "--seed", "3", *FAST,
                   env={"HARMON_MODEL": str(harmon_folder)})
    assert again.returncode == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(tmp_path / "again.png")))


def test_describe_prints_text(harmon_folder, tmp_path):
    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "red.png")
    result = harmon("describe", tmp_path / "red.png", "What colour is it?", "--model", harmon_folder,
                    "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != ""


def test_chat_answers_every_turn(harmon_folder, tmp_path):
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    result = harmon("chat", tmp_path / "blue.png", "--model", harmon_folder, "--max-new-tokens", "4",
                    stdin="What colour?\nAnd the shape?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("harmon> ") == 2


def test_inpaint_writes_the_image(harmon_folder, tmp_path):
    Image.new("RGB", (64, 48), (0, 200, 0)).save(tmp_path / "image.png")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 20, 20))
    mask.save(tmp_path / "mask.png")
    result = harmon("inpaint", tmp_path / "image.png", tmp_path / "mask.png", "a red square", "-o",
                    tmp_path / "out.png", "--model", harmon_folder, *FAST)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 48)


def _prompts_file(tmp_path):
    entries = [{"prompt": "a red circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]},
               {"prompt": "two blue squares", "tag": "counting"}, {"prompt": "a green triangle", "tag": "colors"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path, entries


def _images(outdir, count):
    return [np.asarray(Image.open(outdir / f"{index:05d}" / "samples" / "0000.png")) for index in range(count)]


def test_prompts_file_in_geneval_layout_resumes_and_shards(harmon_folder, tmp_path):
    prompts, entries = _prompts_file(tmp_path)
    single = tmp_path / "single"
    # One thread, as `accelerate launch` gives each CPU process: sums split over threads round differently.
    one_thread = {"OMP_NUM_THREADS": "1"}
    generate_single = ["generate", "--prompts", prompts, "--outdir", single, "--model", harmon_folder, "--size", "32",
                       *FAST]
    result = harmon(*generate_single, env=one_thread)
    assert result.returncode == 0, result.stderr
    for index, entry in enumerate(entries):
        assert json.loads((single / f"{index:05d}" / "metadata.jsonl").read_text()) == entry
    # Resumable: finished images are kept as they are, a missing one is made again.
    kept = single / "00000" / "samples" / "0000.png"
    kept_time = kept.stat().st_mtime_ns
    missing = single / "00002" / "samples" / "0000.png"
    expected_missing = np.asarray(Image.open(missing))
    missing.unlink()
    result = harmon(*generate_single, env=one_thread)
    assert result.returncode == 0 and kept.stat().st_mtime_ns == kept_time
    assert np.array_equal(np.asarray(Image.open(missing)), expected_missing)

    sharded = tmp_path / "sharded"
    launch = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
         "harmon_hf.cli", "generate", "--prompts", str(prompts), "--outdir", str(sharded), "--model",
         str(harmon_folder), "--size", "32", *FAST],
        capture_output=True, text=True, timeout=300,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    for one, two in zip(_images(single, 3), _images(sharded, 3)):
        assert np.array_equal(one, two)


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["describe", "missing.png", "--model", "MODEL"], "no such file: missing.png"),
        (["describe", "notes.txt", "--model", "MODEL"], "notes.txt: not an image that can be read"),
        (["describe", "bomb.png", "--model", "MODEL"], "bomb.png: the image declares more pixels than are ever decoded"),
        (["describe", "red.png", "--max-new-tokens", "0", "--model", "MODEL"], "--max-new-tokens must be at least 1"),
        (["chat", "red.png", "--max-new-tokens", "-1", "--model", "MODEL"], "--max-new-tokens must be at least 1"),
        (["generate", "x", "--size", "50", "--model", "MODEL"], "height must be a positive multiple of 16, got 50"),
        (["generate", "x", "--size", "big", "--model", "MODEL"], "--size must be N or HxW"),
        (["generate", "x", "--size", "\u00b2", "--model", "MODEL"], "--size must be N or HxW"),
        # Zero used to mean "the default", NaN and inf gave black images, 100000 tried to allocate 20 GB.
        (["generate", "x", "--size", "0", "--model", "MODEL"], "height must be a positive multiple of 16, got 0"),
        (["generate", "x", "--steps", "0", "--model", "MODEL"], "num_inference_steps must be a positive integer, got 0"),
        (["generate", "x", "--guidance", "nan", "--model", "MODEL"], "guidance_scale must be a finite number, got nan"),
        (["generate", "x", "--temperature", "inf", "--model", "MODEL"], "temperature must be a finite number >= 0"),
        (["generate", "x", "--size", "100000", "--model", "MODEL"], "positions, more than the LLM's 4096"),
        (["inpaint", "red.png", "red.png", "x", "--guidance=-inf", "--model", "MODEL"], "guidance_scale must be"),
        (["generate", "x", "-o", "folder", "--model", "MODEL"], "folder is a folder: give a file name"),
        (["generate", "x", "-o", "notes.txt/out.png", "--model", "MODEL"], "notes.txt is not a writable folder"),
        (["generate", "x", "-o", "out.pgn", "--model", "MODEL"], "cannot tell an image format from 'out.pgn'"),
        (["generate", "x", "--model", "/no/such/model"], "no such model folder: /no/such/model"),
        (["generate", "x", "--model", "./no-such-model"], "no such model folder: ./no-such-model"),
        (["generate", "--prompts", "missing.jsonl", "--model", "MODEL"], "no such file: missing.jsonl"),
        (["generate", "--model", "MODEL"], "give either a PROMPT or --prompts"),
    ],
)
def test_bad_input_exits_with_one_line(harmon_folder, tmp_path, monkeypatch, arguments, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400 megapixels in a 50 kB file
    arguments = [str(harmon_folder) if argument == "MODEL" else argument for argument in arguments]
    assert_one_line_error(harmon(*arguments, env={"HARMON_MODEL": ""}), fragment)


def test_chat_with_standard_input_closed_is_one_line_error(harmon_folder, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "image.png")
    result = subprocess.run([sys.executable, "-m", "harmon_hf.cli", "chat", str(tmp_path / "image.png"), "--model",
                             str(harmon_folder)], capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: os.close(0))
    assert_one_line_error(result, "chat reads the questions from standard input, which is closed")


def test_the_output_suffix_chooses_the_format_and_no_partial_file_stays(harmon_folder, tmp_path):
    result = harmon("generate", "x", "-o", tmp_path / "out.jpg", "--model", harmon_folder, *FAST)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.jpg") as image:
        assert image.format == "JPEG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jpg"]


def test_two_runs_on_one_prompts_folder_both_finish(harmon_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"a red circle {index}"}) + "\n" for index in range(3)))
    command = [sys.executable, "-m", "harmon_hf.cli", "generate", "--prompts", str(prompts), "--outdir",
               str(tmp_path / "out"), "--model", str(harmon_folder), "--size", "32", *FAST]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
    files = sorted(path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").rglob("*")
                   if path.is_file())
    assert files == [f"{index:05d}/{name}" for index in range(3) for name in ("metadata.jsonl", "samples/0000.png")]
    for index in range(3):
        with Image.open(tmp_path / "out" / f"{index:05d}" / "samples" / "0000.png") as image:
            assert image.size == (32, 32)


def test_no_model_anywhere_is_one_line_error(monkeypatch, capsys):
    import harmon_hf.bundled_model
    from harmon_hf.cli import main

    monkeypatch.setenv("HARMON_MODEL", "")
    monkeypatch.setattr(harmon_hf.bundled_model, "bundled_model_path", lambda: None)  # a package built without the bundled model
    assert main(["generate", "x"]) == 1
    assert "no model given" in capsys.readouterr().err


def test_eval_refuses_too_few_samples(harmon_folder):
    assert_one_line_error(harmon("eval", "shapes", "--n", "2", "--model", harmon_folder), "--n must be at least 5")


def test_help_explains_every_flag():
    result = harmon("generate", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--seed", "--size", "--guidance", "--steps", "--rounds", "--n", "--prompts", "--outdir"):
        assert flag in result.stdout


def test_eval_shapes_prints_a_table_and_writes_the_json(harmon_folder, tmp_path):
    result = harmon("eval", "shapes", "--model", harmon_folder, "--n", "5", "--rounds", "2", "--steps", "3",
                    "--json", tmp_path / "scores.json")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["generation"]) == {"object", "colour", "count", "two objects", "position", "overall"}
    assert set(scores["understanding"]) == {"colour", "shape", "count", "position", "yes/no", "overall"}
    assert scores["samples"] == 5 and scores["sampler"]["num_iter"] == 2
    assert all(0 <= value <= 1 for half in ("generation", "understanding") for value in scores[half].values())
    assert "ShapesEval on held-out combinations (5 samples each)" in result.stdout
    assert f"overall         {scores['understanding']['overall']:.3f}" in result.stdout
    assert "ShapesEval" in result.stderr  # the progress bar


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtype_chooses_what_the_model_computes_in(harmon_folder, tmp_path, monkeypatch, dtype):
    """--dtype reaches the weights and the arithmetic: the outputs of the LLM's and the MAR's linear layers are
    recorded while `generate` and `describe` run (float32 when not asked, the reference's precision)."""
    import torch

    import harmon_hf.cli as cli

    computed = {}
    load = cli.load_pipeline

    def load_and_record(*args, **kwargs):
        pipeline = load(*args, **kwargs)
        for name, module in pipeline.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ("language_model" in name or "mar_" in name):
                module.register_forward_hook(lambda _, __, output, name=name: computed.update({name: output.dtype}))
        return pipeline

    monkeypatch.setattr(cli, "load_pipeline", load_and_record)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    flags = ["--model", str(harmon_folder)] + (["--dtype", dtype] if dtype != "float32" else [])
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "out.png"), *FAST, *flags]) == 0
    assert cli.main(["describe", str(tmp_path / "red.png"), "What colour?", "--max-new-tokens", "2", *flags]) == 0
    assert any("mar_encoder" in name for name in computed) and any("language_model" in name for name in computed)
    assert set(computed.values()) == {getattr(torch, dtype)}


def test_a_device_the_machine_lacks_is_a_clear_error(harmon_folder, tmp_path, monkeypatch, capsys):
    import torch

    from harmon_hf.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    assert main(["describe", str(tmp_path / "red.png"), "--device", "cuda", "--model", str(harmon_folder)]) == 1
    assert capsys.readouterr().err.strip() == ("harmon describe: error: device cuda: this machine has no CUDA GPU that "
                                               "torch can use")


@pytest.mark.parametrize("seed", [str(2**70), "-1", str(2**64), "three"])
@pytest.mark.parametrize("program, arguments", [
    ("generate", ["x", "--model", "/no/such/model"]),
    ("inpaint", ["image.png", "mask.png", "x", "--model", "/no/such/model"]),
    ("eval wise", ["--prompts", "wise.json", "--outdir", "out", "--model", "/no/such/model"]),
    ("eval shapes", ["--model", "/no/such/model"]),
    ("shapes", ["init"]),
], ids=["generate", "inpaint", "eval-wise", "eval-shapes", "shapes-init"])
def test_a_seed_torch_cannot_take_is_refused_in_one_line(program, arguments, seed, capsys):
    """torch's generators take 0 <= seed < 2**64: larger ones stopped after loading the model with "Overflow when
    unpacking long long", a negative one gave the images of another seed."""
    from harmon_hf.cli import main

    with pytest.raises(SystemExit) as stop:
        main([*program.split(), *arguments, "--seed", seed])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"harmon {program}: error: argument --seed: must be an "
                                                        f"integer from 0 to 2**64 - 1 (18446744073709551615), got "
                                                        f"'{seed}'")


@pytest.mark.parametrize("command, message", [
    (["eval", "wise", "--prompts", "wise.json", "--outdir", "out", "--seed", str(2**64 - 2)],
     "--seed 18446744073709551614 leaves too few seeds for 3 prompts: they use --seed to --seed + 2, and torch's "
     "seeds end at 2**64 - 1 (--seed at most 18446744073709551613)"),
    (["eval", "shapes", "--n", "5", "--seed", str(2**64 - 4)],
     "--seed 18446744073709551612 leaves too few seeds for 5 samples: they use --seed to --seed + 4"),
], ids=["eval-wise", "eval-shapes"])
def test_seeds_that_run_past_torchs_range_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, command,
                                                                             message):
    from harmon_hf.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wise.json").write_text(json.dumps([{"Prompt": f"a cat {i}", "prompt_id": i} for i in range(3)]))
    assert main([*command, "--model", "/no/such/model"]) == 1
    assert capsys.readouterr().err.startswith(f"harmon eval: error: {message}")
    assert not (tmp_path / "out").exists()
    largest = [*command[:-1], str(int(command[-1]) - 1)]  # the largest seed that leaves enough: on to the model
    assert main([*largest, "--model", "/no/such/model"]) == 1
    assert "no such model folder: /no/such/model" in capsys.readouterr().err
