"""Harmon-Shapes, the small model trained by this project's own recipe (`training/recipes/shapes/build.sh`), shipped
inside the package as the default model."""

from pathlib import Path


BUNDLED_MODEL = Path(__file__).parent / "models" / "harmon-shapes"


def bundled_model_path() -> Path | None:
    """The bundled model's folder, or None in a package built without it."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else None
