"""The built-in Shapes world: procedural captioned images and videos with ground-truth attributes."""

from shapes.world import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    POSITIONS,
    SHAPES,
    SPEEDS,
    ShapesSample,
    ShapesWorld,
    parse_caption,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "DIRECTIONS", "POSITIONS", "SHAPES", "SPEEDS",
    "ShapesSample", "ShapesWorld", "parse_caption",
]
