"""The induction run's figures, drawn from its saved results (meta.json's maps and verdict), never recomputed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnlab.core.names import model_label
from attnlab.figures.heatmap import induction_map
from attnlab.induction.experiment import figure_name, query_words, target_words


def _array(rows) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def plot(folder: Path, meta: dict) -> dict:
    """One heatmap per target: ``{target: file name}``. Only the heads the verdict names are outlined."""
    cfg, causal = meta["config"], bool(meta.get("causal"))
    out = {}
    for target, maps in meta["maps"].items():
        v = (meta.get("verdict") or {}).get(target, {})
        named = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in v.get("heads", [])]
        if named:
            finding = f"named induction heads ({v['rule']}): {', '.join(v['heads'][:6])}"
        else:
            s = v.get("strongest") or {}
            finding = (f"no head passes the verdict - strongest {s.get('head', '?')} {s.get('mean') or 0:.3g}, "
                       f"chance {maps.get('chance', float('nan')):.3g}, null {s.get('null') or 0:.3g}")
        name = figure_name(cfg["variant"], target)
        induction_map(_array(maps["mean"]), _array(maps["sem"]),
                      f"Induction map: {model_label(cfg['model'])}, {cfg['variant']} RRT ({cfg['protocol']} protocol)\n"
                      f"attention from {query_words(causal)} to the {target_words(target, causal)}, "
                      f"{meta['n_trials']} trials; uniform attention (chance) = {maps.get('chance', float('nan')):.3g}",
                      folder / name, outline=named, finding=finding)
        out[target] = name
    return out
