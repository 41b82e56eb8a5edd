"""The FSDP config loads with accelerate's own loader and shards what the model says (tests/test_sharded_training.py
runs every config)."""

import os
from pathlib import Path
from unittest import mock

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

from harmon_hf.modeling.modeling_harmon import HarmonPreTrainedModel

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "accelerate"


def launch_environment(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config --num_processes 2` gives each training process."""
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "train.py"])
    _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_fsdp_config_shards_each_no_split_module():
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).distributed_type == DistributedType.FSDP
    with mock.patch.dict(os.environ, launch_environment(CONFIGS / "fsdp.yaml")):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == HarmonPreTrainedModel._no_split_modules
