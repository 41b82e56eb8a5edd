import json
import os
import subprocess
import sys
from pathlib import Path

import datasets.config
import pytest
import torch
from safetensors.torch import load_file

# datasets sleeps 5 s whenever a stream mixing parquet sources stops, for pyarrow's threads to close
# (apache/arrow#45214); the tests stop hundreds of short streams, where those seconds would be most of their time.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


REPO = Path(__file__).resolve().parents[1]
# The first lines of a script that runs Harmon as Hub remote code: importing harmon_hf fails in it.
WITHOUT_HARMON_HF = """
import sys, importlib.abc

class BlockHarmonHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "harmon_hf":
            raise ImportError("harmon_hf is blocked in this test")

sys.meta_path.insert(0, BlockHarmonHF())
"""


def run_harmon(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    """The `harmon` command as users run it: a real subprocess, with `env` added to this environment."""
    return subprocess.run([sys.executable, "-m", "harmon_hf.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env={**os.environ, **(env or {})}, timeout=timeout)
REFERENCE = REPO.parent / "shared" / "reference"
GOLDEN = REFERENCE / "golden"


@pytest.fixture(scope="session")
def golden() -> dict:
    return load_file(GOLDEN / "vectors.safetensors")


@pytest.fixture(scope="session")
def golden_reference_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The golden tiny release converted through the `harmon convert` command."""
    from harmon_hf.cli import main

    output = tmp_path_factory.mktemp("harmon-tiny")
    status = main(
        [
            "convert",
            "--checkpoint", str(GOLDEN / "harmon_tiny.pth"),
            "--vae", str(GOLDEN / "kl_tiny.ckpt"),
            "--config", str(GOLDEN / "config.json"),
            "--output", str(output),
        ]
    )
    assert status == 0
    return output


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    from harmon_hf import HarmonForConditionalGeneration

    return HarmonForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4, name: str = ""):
    """max |a - e| <= tolerance * max(1, |e|): absolute for small values, relative where they are large."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = ((actual.float() - expected.float()).abs() / expected.float().abs().clamp(min=1.0)).max().item()
    assert error <= tolerance, f"{name}: scaled error {error:.3g} > {tolerance}"


@pytest.fixture(scope="session")
def harmon_folder(tmp_path_factory) -> Path:
    """The golden tiny model with a tiny tokenizer made here: model, processor and remote code in one folder."""
    from harmon_hf.convert import convert
    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("harmon-with-processor")
    make_tiny_tokenizer().save_pretrained(root / "tokenizer")
    convert(GOLDEN / "harmon_tiny.pth", GOLDEN / "kl_tiny.ckpt", GOLDEN / "config.json",
            output=root / "model", tokenizer=str(root / "tokenizer"))
    return root / "model"


@pytest.fixture(scope="session")
def pipe(harmon_folder):
    from harmon_hf import HarmonPipeline

    pipeline = HarmonPipeline.from_pretrained(harmon_folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def hub_cache_repository(cache: Path, repo_id: str, revisions: dict[str, Path], branch: str = "main") -> dict[str, str]:
    """A Hub repository as huggingface_hub caches it (`cache` is HF_HUB_CACHE): one snapshot per revision, each a
    copy of a folder under a commit hash made from its name; `branch` points at the last one. Returns name -> hash."""
    import hashlib
    import shutil

    repository = cache / f"models--{repo_id.replace('/', '--')}"
    commits = {}
    for name, folder in revisions.items():
        commits[name] = hashlib.sha1(name.encode()).hexdigest()
        shutil.copytree(folder, repository / "snapshots" / commits[name])
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / branch).write_text(commits[name])
    return commits


def load_script(path: str):
    """A script of the repository that is not part of the package (e.g. "benchmarks/shapes/diagnose.py"), imported
    once as a module named after its path and kept in sys.modules, so that tests call and monkeypatch that one copy."""
    import importlib.util

    name = path.removesuffix(".py").replace("/", ".")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # as a failed import does, so that the next attempt runs the script again
            raise
    return sys.modules[name]
