"""Sampling presets, their techniques one at a time, and variants, by name, for the benchmarks.

    fast                          a preset of SAMPLING_PRESETS
    fast:step-annealing           the reference sampler with only that technique of the preset on
    fastest+last_round_steps=3    a preset (or one of its techniques) with fields of HarmonSamplingPreset changed
"""

import dataclasses
import json

from harmon_hf import SAMPLING_PRESETS, HarmonSamplingPreset


# Each technique and the HarmonSamplingPreset fields that make it.
TECHNIQUES = {
    "bfloat16": ("bfloat16",),
    "fewer-rounds": ("round_fraction",),
    "step-annealing": ("first_round_steps", "last_round_steps"),
    "guidance-reuse": ("guidance_refresh",),
}


def preset_named(name: str) -> HarmonSamplingPreset:
    base, *changes = name.split("+")
    preset_name, _, technique = base.partition(":")
    if preset_name not in SAMPLING_PRESETS or (technique and technique not in TECHNIQUES):
        raise SystemExit(f"unknown preset {name!r}: expected one of {sorted(SAMPLING_PRESETS)}, optionally followed "
                         f"by :TECHNIQUE, one of {sorted(TECHNIQUES)}, and +FIELD=VALUE changes")
    preset = SAMPLING_PRESETS[preset_name]
    if technique:
        fields = TECHNIQUES[technique]
        preset = dataclasses.replace(HarmonSamplingPreset(), **{field: getattr(preset, field) for field in fields})
    try:
        return dataclasses.replace(preset, **{field: json.loads(value) for field, value in
                                              (change.split("=", 1) for change in changes)})
    except (ValueError, TypeError) as error:
        raise SystemExit(f"preset {name!r}: {error}") from error
