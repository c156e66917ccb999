"""Interactive, self-contained views of finished runs: ``attnlab view RUN_DIR`` and the report's index.html.

An induction map becomes a plotly heatmap: hovering a cell shows layer, head, mean, SEM and the number of
trials; clicking it draws that head's attention from the [MASK] query over every token of a few trials (the
bertviz idea, from the rows ``trials.npz`` keeps), with the masked position and the targets marked. A UMAP
run becomes a scatter of its framed panel with each point's token on hover. plotly.js is embedded once per
page: no network, no CDN. The only hand-written JavaScript is the click handler that draws the token view.

Data in the page: maps from ``meta.json`` (what ``scores.csv`` holds, 6 significant digits); attention rows
quantised to 1/255 (a drawing, not a measurement) and base64-encoded.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from attnlab.core.errors import InputError
from attnlab.core.models import model_label
from attnlab.core.outputs import read_json, write_text

_JS = r"""
function attnlabRows(run) {
  if (!run._rows) {
    const bytes = Uint8Array.from(atob(run.rows), c => c.charCodeAt(0));
    run._rows = bytes;
  }
  return run._rows;
}
function attnlabTokenView(detailId, run, layer, head, target, title) {
  const rows = attnlabRows(run), [n, L, H, S] = run.shape, traces = [], shapes = [], annotations = [];
  const height = 1 / n;
  for (let t = 0; t < n; t++) {
    const base = ((t * L + layer) * H + head) * S, y = [], text = [];
    for (let s = 0; s < S; s++) { y.push(rows[base + s] / 255); text.push(run.tokens[t][s]); }
    const axis = t === 0 ? '' : String(t + 1);
    traces.push({type: 'bar', x: [...Array(S).keys()], y: y, text: text, textposition: 'none',
                 hovertemplate: 'position %{x}: %{text}<br>attention %{y:.3f}<extra>trial ' + (t + 1) + '</extra>',
                 xaxis: 'x' + axis, yaxis: 'y' + axis, marker: {color: '#3182bd'}, showlegend: false});
    for (let s = 0; s < S; s++) {  // every instance of the masked token: where the copies put it
      if (run.masked && run.tokens[t][s] === run.masked[t]) {
        shapes.push({type: 'rect', xref: 'x' + axis, yref: 'y' + axis + ' domain', x0: s - 0.5, x1: s + 0.5, y0: 0, y1: 1,
                     fillcolor: '#fdd0a2', opacity: 0.6, line: {width: 0}, layer: 'below'});
      }
    }
    const marks = [[run.mask[t], (run.query || '[MASK]') + ' (query)', '#d95f02']].concat(
      Object.keys(run.targets).map(k => [run.targets[k][t], k, k === target ? '#1b9e77' : '#999999']));
    for (const [pos, name, color] of marks) {
      shapes.push({type: 'line', xref: 'x' + axis, yref: 'y' + axis + ' domain', x0: pos, x1: pos, y0: 0, y1: 1,
                   line: {color: color, width: name === target ? 2 : 1, dash: name === target ? 'solid' : 'dot'}});
      annotations.push({xref: 'x' + axis, yref: 'y' + axis + ' domain', x: pos, y: 1.02, text: name,
                        showarrow: false, font: {size: 9, color: color}, yanchor: 'bottom'});
    }
  }
  document.getElementById(detailId).innerHTML = '';
  const layout = {title: {text: title + ' - L' + layer + 'H' + head + ': attention from ' + (run.query || '[MASK]') +
                          ' over the tokens of ' + n + ' trials' +
                          (run.masked ? ' (shaded: the instances of the query token)' : ''), font: {size: 12}},
                  height: 170 * n + 60, margin: {l: 50, r: 10, t: 50, b: 30}, shapes: shapes, annotations: annotations,
                  grid: {rows: n, columns: 1, pattern: 'independent', ygap: 0.35}, bargap: 0};
  Plotly.newPlot(detailId, traces, layout, {displayModeBar: false, responsive: true});
}
function attnlabHeatmap(divId, detailId, spec, run, target, title) {
  const gd = document.getElementById(divId);
  Plotly.newPlot(gd, spec.data, spec.layout, {displayModeBar: false, responsive: true}).then(() => {
    gd.on('plotly_click', ev => {
      const p = ev.points[0];
      attnlabTokenView(detailId, run, p.y, p.x, target, title);
    });
  });
}
"""


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _encode_rows(rows: np.ndarray) -> str:
    q = np.clip(np.rint(rows.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return base64.b64encode(q.tobytes()).decode()


def induction_run_data(run_dir) -> dict | None:
    """The view data of one induction run folder (meta.json + trials.npz), or None if it has no view rows."""
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "meta.json")
    if not meta or meta.get("experiment") != "induction" or not (run_dir / "trials.npz").is_file():
        return None
    z = np.load(run_dir / "trials.npz")
    if "view_rows" not in z.files:
        return None
    rows = z["view_rows"]
    n = rows.shape[0]
    targets = {k[len("target_index_"):]: z[k][:n].tolist() for k in z.files if k.startswith("target_index_")}
    return {"meta": meta, "run": {"rows": _encode_rows(rows), "shape": list(rows.shape),
                                  "tokens": z["view_tokens"].tolist(), "mask": z["mask_index"][:n].tolist(),
                                  "targets": targets,
                                  "masked": z["view_masked"].tolist() if "view_masked" in z.files else None,
                                  # decoders have no [MASK]: the query is a token of the second copy
                                  "query": "the repeated token" if meta.get("causal") else "[MASK]"}}


def heatmap_spec(meta: dict, target: str) -> dict:
    """A plotly heatmap of one target's map with layer, head, mean, SEM and n on hover."""
    import plotly.graph_objects as go

    maps = meta["maps"][target]
    mean = np.array([[np.nan if v is None else v for v in row] for row in maps["mean"]], dtype=float)
    sem = maps["sem"]
    n = meta.get("n_trials", "?")
    hover = [[f"layer {layer}, head {head}<br>mean {mean[layer][head]:.4f}"
              + (f" ± {sem[layer][head]:.4f} (SEM)" if sem[layer][head] is not None else " (SEM: n/a)")
              + f"<br>n = {n} trials" for head in range(mean.shape[1])] for layer in range(mean.shape[0])]
    fig = go.Figure(go.Heatmap(z=mean, text=hover, hoverinfo="text", colorscale="Blues", zmin=0,
                               zmax=max(float(np.nanmax(mean)), 1e-9), colorbar={"title": {"text": "mean"}},
                               xgap=1, ygap=1))
    fig.update_layout(height=max(260, 22 * mean.shape[0] + 120), margin={"l": 50, "r": 10, "t": 30, "b": 40},
                      xaxis={"title": {"text": "Head"}, "dtick": 1}, yaxis={"title": {"text": "Layer"}, "dtick": 1,
                                                                           "autorange": "reversed"},
                      title={"text": "auto-scaled; hover for values, click a cell for its tokens", "font": {"size": 12}})
    return json.loads(fig.to_json())


def umap_spec(run_dir) -> dict | None:
    """A plotly scatter of a UMAP run's framed panel (queries and keys, token on hover), or None."""
    import plotly.graph_objects as go

    run_dir = Path(run_dir)
    meta = read_json(run_dir / "meta.json")
    if not meta or meta.get("experiment") != "geometry-umap":
        return None
    name = next((f for f in meta["outputs"] if f.endswith(".npz")), None)
    z = np.load(run_dir / name)
    if "query_tokens" not in z.files:
        return None
    constants = z["constants"].tolist()
    optimum = meta.get("optimum")
    c = min(constants, key=lambda x: abs(np.log(x / optimum))) if optimum else (1.0 if 1.0 in constants else constants[0])
    emb, n_q = z[f"c_{c:g}"], int(z["n_queries"])
    fig = go.Figure([
        go.Scatter(x=emb[n_q:, 0], y=emb[n_q:, 1], mode="markers", name="keys", text=z["key_tokens"].tolist(),
                     hovertemplate="key: %{text}<extra></extra>", marker={"size": 4, "color": "#d95f02", "opacity": 0.6}),
        go.Scatter(x=emb[:n_q, 0], y=emb[:n_q, 1], mode="markers", name="queries",
                     text=z["query_tokens"].tolist(), hovertemplate="query: %{text}<extra></extra>",
                     marker={"size": 4, "color": "#1b9e77", "opacity": 0.6}),
    ])
    cfg = meta["config"]
    fig.update_layout(height=480, margin={"l": 30, "r": 10, "t": 40, "b": 30},
                      title={"text": f"L{cfg['layer']}H{cfg['head']}, c = {c:g}" + (" (optimal)" if optimum else "")
                             + ": hover a point for its token", "font": {"size": 12}},
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False})
    return json.loads(fig.to_json())


class Page:
    """Collects interactive blocks; ``html()`` renders them with plotly.js embedded once."""

    def __init__(self):
        self.runs: dict = {}
        self.blocks: list[str] = []
        self.scripts: list[str] = []

    def add_induction(self, key: str, data: dict, target: str, title: str) -> str:
        """An interactive map of ``target`` from an induction run's view data; returns its HTML block."""
        self.runs.setdefault(key, data["run"])
        i = len(self.scripts)
        spec = heatmap_spec(data["meta"], target)
        self.scripts.append(f"attnlabHeatmap('attnlab-map-{i}', 'attnlab-detail-{i}', {json.dumps(spec)}, "
                            f"ATTNLAB_RUNS[{json.dumps(key)}], {json.dumps(target)}, {json.dumps(title)});")
        return (f"<div class='interactive'><div id='attnlab-map-{i}' class='map'></div>"
                f"<div id='attnlab-detail-{i}' class='detail'><p class='hint'>Click a cell to see that head's "
                "attention from [MASK] over the tokens of a few trials.</p></div></div>")

    def add_umap(self, spec: dict) -> str:
        i = len(self.scripts)
        self.scripts.append(f"Plotly.newPlot('attnlab-umap-{i}', {json.dumps(spec['data'])}, "
                            f"{json.dumps(spec['layout'])}, {{displayModeBar: false, responsive: true}});")
        return f"<div class='interactive'><div id='attnlab-umap-{i}' class='umap'></div></div>"

    def head(self) -> str:
        """What goes into <head>: plotly.js and the glue (only when there is something interactive)."""
        if not self.scripts:
            return ""
        return f"<script>{_plotly_js()}</script><script>{_JS}</script>"

    def tail(self) -> str:
        if not self.scripts:
            return ""
        runs = json.dumps(self.runs)
        return (f"<script>const ATTNLAB_RUNS = {runs};\nwindow.addEventListener('load', () => {{\n"
                + "\n".join(self.scripts) + "\n});</script>")


STYLE = (".interactive{margin:.5em 0 1.5em}.map{width:100%}.detail{width:100%}.hint{color:#666;font-size:.9em}"
         ".umap{width:100%}")


def write_view(run_dir) -> Path:
    """``RUN_DIR/view.html`` for an induction or UMAP run folder (``attnlab view``)."""
    from attnlab.experiments.induction import TARGET_WORDS, target_words

    run_dir = Path(run_dir)
    meta = read_json(run_dir / "meta.json")
    if meta is None:
        raise InputError(f"{run_dir} holds no finished run (no meta.json); pass a run folder of `attnlab induction` "
                         "or `attnlab geometry umap`")
    page, body = Page(), []
    label = model_label(meta.get("config", {}).get("model", "?"))
    if meta.get("experiment") == "induction":
        data = induction_run_data(run_dir)
        if data is None:
            raise InputError(f"{run_dir} was written by an attnlab without the view data; rerun it with --force")
        order = list(TARGET_WORDS)
        for target in sorted(meta["maps"], key=lambda t: order.index(t) if t in order else len(order)):
            title = f"{label}: {target_words(target)}"
            body.append(f"<h2>{html.escape(title)}</h2>" + page.add_induction("run", data, target, title))
    elif meta.get("experiment") == "geometry-umap":
        spec = umap_spec(run_dir)
        if spec is None:
            raise InputError(f"{run_dir} was written by an attnlab without token text; rerun it with --force")
        body.append(f"<h2>{html.escape(label)}: joint UMAP of queries and keys</h2>" + page.add_umap(spec))
    else:
        raise InputError(f"{run_dir} holds a '{meta.get('experiment')}' run; `view` shows induction and UMAP runs")
    out = run_dir / "view.html"
    write_text(out, "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>attnlab view</title>"
               f"<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}}{STYLE}</style>"
               f"{page.head()}</head><body><h1>{html.escape(label)}</h1>{''.join(body)}{page.tail()}</body></html>\n")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="interactive page (view.html) of an induction or UMAP run folder",
                       description=__doc__.split("Data in the page")[0])
    p.add_argument("run_dir", help="a run folder written by `attnlab induction` or `attnlab geometry umap`")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print(f"wrote {write_view(args.run_dir)}")
    return 0
