"""Small charts for notebooks without a plotting library: SVG in HTML, bars in text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spear_nb.notebook.display import render

BAR_AREA = 360
LABEL_WIDTH = 200
ROW = 22


class BarChart:
    """Horizontal bars, one per label, on a linear scale from zero.

    ``_repr_html_`` draws SVG in JupyterLab's theme colours; ``repr`` draws the
    same bars with characters, so the figure reads in a terminal too.
    """

    def __init__(
        self, values: Mapping[str, float], *, unit: str = "", title: str = ""
    ) -> None:
        self.values = {str(k): float(v) for k, v in values.items()}
        self.unit = unit
        self.title = title

    def _bars(self) -> list[dict[str, Any]]:
        top = max(self.values.values(), default=0.0) or 1.0
        return [
            {
                "label": label,
                "value": value,
                "text": f"{value:.3g} {self.unit}".strip(),
                "width": max(1.0, value / top * BAR_AREA),
                "y": index * ROW,
            }
            for index, (label, value) in enumerate(self.values.items())
        ]

    def __repr__(self) -> str:
        top = max(self.values.values(), default=0.0) or 1.0
        width = max((len(k) for k in self.values), default=0)
        lines = [self.title] if self.title else []
        for label, value in self.values.items():
            bar = "#" * max(1, round(value / top * 40))
            lines.append(f"{label:<{width}}  {bar} {value:.3g} {self.unit}".rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return render(
            "bars.html.j2",
            title=self.title,
            bars=self._bars(),
            label_width=LABEL_WIDTH,
            width=LABEL_WIDTH + BAR_AREA + 90,
            height=len(self.values) * ROW + 4,
        )


def bar_chart(
    values: Mapping[str, float], *, unit: str = "", title: str = ""
) -> BarChart:
    """Draw ``values`` (label to number) as horizontal bars."""
    return BarChart(values, unit=unit, title=title)
