"""X/Y plots (AUTOMATIC1111's "X/Y/Z plot" script) over NeTI's controls: truncation (Sec. 3.4, Fig. 11), bypass
strength (Sec. 3.3), the style-mixing start timestep (Fig. 20) and the seed.

An `Axis` is a control and its values, parsed from what a user types ("2, 8, 32, full"); `points` crosses two
axes into the settings of each grid cell, rows being the y values and columns the x values.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DEFAULT_HIDDEN_DIM
from .mapper import parse_truncations

AXES = ("truncation", "bypass strength", "mix start", "seed")
SETTING = {"truncation": "truncation", "bypass strength": "alpha", "mix start": "mix_start", "seed": "seed"}
MAX_VALUES = 16  # per axis: a grid is rendered as one batch


@dataclass(frozen=True)
class Axis:
    name: str  # one of AXES
    values: tuple

    @property
    def setting(self) -> str:
        return SETTING[self.name]

    def labels(self) -> list[str]:
        return [axis_label(self.name, v) for v in self.values]


def axis_label(name: str, value) -> str:
    if name == "truncation":
        return "full" if value is None else str(value)
    if name == "mix start":
        return f"t={value:g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_axis(name: str, text: str, hidden_dim: int = DEFAULT_HIDDEN_DIM) -> Axis:
    """The values typed for an axis, checked: truncations 1..hidden_dim or 'full', bypass strengths in [0, 1],
    mix starts in [0, 1000], seeds >= 0. A ValueError names the axis and the bad value."""
    if name not in AXES:
        raise ValueError(f"X/Y axis {name!r} is unknown; use one of {', '.join(AXES)}")
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        raise ValueError(f"give the {name} values for the X/Y grid, separated by commas")
    if len(parts) > MAX_VALUES:
        raise ValueError(f"{len(parts)} {name} values; the X/Y grid takes at most {MAX_VALUES} per axis")
    if name == "truncation":
        return Axis(name, tuple(parse_truncations(",".join(parts), hidden_dim)))
    values = []
    for part in parts:
        try:
            value = int(part) if name == "seed" else float(part)
        except ValueError:
            raise ValueError(f"{name} value {part!r} is not a number") from None
        low, high = {"bypass strength": (0.0, 1.0), "mix start": (0.0, 1000.0), "seed": (0, 2**63 - 1)}[name]
        if not low <= value <= high:
            raise ValueError(f"{name} value {part!r} is out of range: give values from {low:g} to {high:g}")
        values.append(value)
    return Axis(name, tuple(values))


def points(x: Axis, y: Axis, base: dict) -> list[dict]:
    """The settings of every cell, row-major (one row per y value): `base` with the two axes' settings set."""
    if x.name == y.name:
        raise ValueError(f"the X and Y axes are both {x.name!r}; choose two different controls")
    return [{**base, y.setting: vy, x.setting: vx} for vy in y.values for vx in x.values]
