"""How result objects show themselves in Jupyter (``_repr_html_``): small, self-contained HTML - layers x heads
maps as coloured tables with the numbers in them, tokens as coloured text, figures as embedded PNGs.

Everything from a model's files or a corpus (tokens, names) is escaped here, so a notebook cell never runs it.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

_BLUE = (8, 81, 156)


def _cell_style(alpha: float) -> str:
    alpha = 0.0 if not np.isfinite(alpha) else float(min(max(alpha, 0.0), 1.0))
    colour = "#fff" if alpha > 0.55 else "#000"
    return f"background:rgba({_BLUE[0]},{_BLUE[1]},{_BLUE[2]},{0.9 * alpha:.3f});color:{colour}"


def heat_table(values, title: str, fmt: str = ".3f", marked=(), note: str = "", vmax: float | None = None) -> str:
    """A ``[L, H]`` map as an HTML table: rows are layers, columns heads, each cell its value, shaded from 0 to
    ``vmax`` (default: the largest finite value); ``marked`` cells ((layer, head) pairs) are framed."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    top = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    marked = {tuple(int(v) for v in m) for m in marked}
    e = html.escape
    head = "".join(f"<th style='padding:2px 4px'>H{h}</th>" for h in range(values.shape[1]))
    rows = []
    for layer in range(values.shape[0]):
        cells = []
        for h in range(values.shape[1]):
            v = values[layer, h]
            frame = ";outline:2px solid #d95f02" if (layer, h) in marked else ""
            text = format(v, fmt) if np.isfinite(v) else "-"
            cells.append(f"<td style='{_cell_style(v / top if top > 0 else 0)}{frame};padding:2px 4px;"
                         f"text-align:right;font-size:11px'>{e(text)}</td>")
        rows.append(f"<tr><th style='padding:2px 4px'>L{layer}</th>{''.join(cells)}</tr>")
    caption = f"<caption style='caption-side:top;text-align:left;font-weight:600'>{e(title)}</caption>"
    foot = f"<div style='color:#555;font-size:12px;margin:2px 0 10px'>{e(note)}</div>" if note else ""
    return (f"<table style='border-collapse:collapse;margin:4px 0'>{caption}<tr><th></th>{head}</tr>{''.join(rows)}"
            f"</table>{foot}")


def token_strip(tokens, weights, label: str = "") -> str:
    """Tokens as text, each shaded by its weight (0 .. the largest)."""
    w = np.asarray(weights, dtype=float)
    top = float(np.nanmax(w)) if w.size and np.isfinite(w).any() else 1.0
    e = html.escape
    spans = "".join(f"<span title='{e(f'{v:.3g}')}' style='{_cell_style(v / top if top > 0 else 0)};padding:1px 2px;"
                    f"border-radius:3px'>{e(str(t))}</span> " for t, v in zip(tokens, w))
    lead = f"<b style='font-size:12px'>{e(label)}</b> " if label else ""
    return f"<div style='line-height:1.9;margin:2px 0'>{lead}{spans}</div>"


def figure_png(fig) -> str:
    """A matplotlib figure as an embedded PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"<img alt='figure' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def block(title: str, *parts: str) -> str:
    return f"<div><h4 style='margin:6px 0'>{html.escape(title)}</h4>{''.join(parts)}</div>"


def paragraph(text: str) -> str:
    return f"<p style='margin:4px 0'>{html.escape(text)}</p>"
