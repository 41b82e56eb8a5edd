"""Harmon-Shapes: a synthetic world of flat shapes, a detector that judges images of it, and ShapesEval."""

from .detector import Detection, Requirement, detect, satisfies
from .world import PALETTE, QUESTION_TYPES, SHAPES, Scene, ShapeObject, caption, render, sample_scene, shapes_dataset

__all__ = ["Detection", "PALETTE", "QUESTION_TYPES", "Requirement", "SHAPES", "Scene", "ShapeObject", "caption",
           "detect", "render", "sample_scene", "satisfies", "shapes_dataset"]
