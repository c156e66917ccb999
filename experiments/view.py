"""Interactive, self-contained views of finished runs: ``attnlab view RUN_DIR`` and the report's index.html.

An induction map becomes a plotly heatmap: hovering a cell shows layer, head, mean, SEM, null, lift, chance,
the number of trials and whether the verdict names the head; clicking it draws that head's attention from the
query over every token of a few trials (the bertviz idea, from the rows ``trials.npz`` keeps), with the query
and the targets marked. A UMAP run becomes a scatter of its framed panel with each point's token on hover.
plotly.js is embedded once per page: no network, no CDN. The only hand-written JavaScript (the click handler
that draws the token view) is ``experiments/static/view.js``, shipped as package data. Every string from a
model's files, a corpus or a plugin enters the page through :func:`script_json` (and :func:`plot_text` for
what plotly draws as text), so it is shown, never run. Only finished, intact runs are shown.

Data in the page: maps from ``meta.json`` (what ``scores.csv`` holds, 6 significant digits); attention rows as
float16 (3 significant digits, what ``trials.npz`` keeps), base64-encoded.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from attnlab.core.errors import InputError
from attnlab.core.names import model_label
from attnlab.core.outputs import read_json, write_text

def _static(name: str) -> str:
    """A file shipped with attnlab under experiments/static/ (package data)."""
    from importlib.resources import files

    return files("attnlab.experiments").joinpath("static", name).read_text(encoding="utf-8")


def script_json(obj) -> str:
    """JSON that is safe inside an HTML ``<script>`` element: ``<``, ``>``, ``&`` and the JavaScript line
    separators U+2028/9 are escaped, so data from a model's files (a vocabulary holding ``</script>``), a corpus or
    a plugin can never end the script or start another."""
    text = json.dumps(obj)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def plot_text(text: str) -> str:
    """A string plotly draws as text: its pseudo-HTML markup characters as entities, so a token is shown, never
    interpreted."""
    return html.escape(str(text), quote=False)


PLOTLY_BUNDLE = "plotly-cartesian-4.1.1.min.js.gz"  # the heatmap and scatter traces, no map tiles: 1.5 of 4.8 MB


def _plotly_js() -> str:
    """plotly.js's cartesian bundle (MIT; ``static/plotly-LICENSE.txt``), the same plotly.js version as the plotly
    package's full bundle; the report draws only heatmaps and scatters."""
    import gzip
    from importlib.resources import files

    return gzip.decompress(files("attnlab.experiments").joinpath("static", PLOTLY_BUNDLE).read_bytes()).decode("utf-8")


def _encode_f16(rows) -> str:
    """float16 bytes, base64: the page's attention values (3 significant digits; trials.npz holds the same)."""
    import numpy as np

    return base64.b64encode(np.ascontiguousarray(rows, dtype="<f2").tobytes()).decode()


def finished_meta(run_dir) -> dict | None:
    """The meta.json of a finished, intact run in ``run_dir`` (every output still as written), else None."""
    from attnlab.core.outputs import file_record, valid_meta

    run_dir = Path(run_dir)
    meta = read_json(run_dir / "meta.json")
    if not valid_meta(meta):
        return None
    for name in meta["outputs"]:
        path = run_dir / name
        if not path.is_file() or path.is_symlink() or file_record(path) != {
                k: meta["files"][name].get(k) for k in ("bytes", "sha256")}:
            return None
    return meta


def induction_run_data(run_dir, meta: dict | None = None) -> dict | None:
    """The view data of one induction run folder (meta.json + trials.npz), or None if it has no view rows.

    ``run``: ``rows`` (float16, base64) ``[n, L, H, S]`` of the first n trials; ``trials``: per trial shown, its
    tokens (ids into ``vocab``), query position, target positions and masked token; ``top``: per target, per head
    the trial that contributes most to the mean, that head's row of it (float16 ``[L, H, S]``) and its share of
    the sum over all trials. Token text enters as data (``script_json``) and is shown as text, never markup."""
    import numpy as np

    run_dir = Path(run_dir)
    meta = meta or finished_meta(run_dir)
    if not meta or meta.get("experiment") != "induction" or "trials.npz" not in meta["outputs"]:
        return None
    z = np.load(run_dir / "trials.npz")
    if "view_rows" not in z.files or "view_vocab_ids" not in z.files:
        return None
    rows = z["view_rows"]
    n = rows.shape[0]
    ids, mask = z["input_ids"], z["mask_index"]
    names = [k[len("target_index_"):] for k in z.files if k.startswith("target_index_")]
    vocab = dict(zip(z["view_vocab_ids"].tolist(), z["view_vocab_tokens"].tolist()))
    masked_all = z["masked_token"] if not meta.get("causal") and "masked_token" in z.files else None
    top, shown = {}, set(range(n))
    for name in names:
        if f"top_trial_{name}" not in z.files:
            continue
        which = z[f"top_trial_{name}"]
        per_trial = z[f"attention_{name}"].astype(np.float64)  # [T, L, H]
        total = per_trial.sum(0)
        best = np.take_along_axis(per_trial, which[None], 0)[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, best / total, np.nan)
        top[name] = {"trial": which.tolist(), "rows": _encode_f16(z[f"top_rows_{name}"]),
                     "share": [[None if not np.isfinite(v) else round(float(v), 4) for v in r] for r in share]}
        shown |= set(which.flatten().tolist())
    trials = {}
    wide = int(ids.max(initial=0)) >= 2 ** 16 or int(ids.min(initial=0)) < 0
    id_type = "<i4" if wide else "<u2"  # token ids as little-endian base64: a third of JSON's size
    for t in sorted(shown):
        trials[str(t)] = {"ids": base64.b64encode(ids[t].astype(id_type).tobytes()).decode(), "mask": int(mask[t]),
                          "targets": {k: int(z[f"target_index_{k}"][t]) for k in names}}
        if masked_all is not None:  # the token [MASK] replaced (masked LMs only)
            trials[str(t)]["masked"] = vocab.get(int(masked_all[t]), str(int(masked_all[t])))
    return {"meta": meta, "run": {"rows": _encode_f16(rows), "shape": list(rows.shape), "trials": trials,
                                  "vocab": {str(k): v for k, v in vocab.items()}, "top": top,
                                  "ids_type": "i32" if wide else "u16",
                                  "n_trials": int(ids.shape[0]), "causal": bool(meta.get("causal")),
                                  # decoders have no [MASK]: the query is a token of the second copy
                                  "query": "the repeated token" if meta.get("causal") else "[MASK]"}}


def heatmap_spec(meta: dict, target: str) -> dict:
    """A plotly heatmap of one target's map with layer, head, mean, SEM, null, lift and n on hover."""
    import numpy as np
    import plotly.graph_objects as go

    maps = meta["maps"][target]
    mean = np.array([[np.nan if v is None else v for v in row] for row in maps["mean"]], dtype=float)
    sem, null, lift = maps["sem"], maps.get("null"), maps.get("lift")
    n = meta.get("n_trials", "?")
    named = set((meta.get("verdict") or {}).get(target, {}).get("heads", []))

    def cell(layer, head):
        text = f"layer {layer}, head {head}<br>mean {mean[layer][head]:.4f}"
        text += f" ± {sem[layer][head]:.4f} (SEM)" if sem[layer][head] is not None else " (SEM: n/a)"
        if null is not None and null[layer][head] is not None:
            text += f"<br>null {null[layer][head]:.4f}, lift {lift[layer][head]:.4f}"
        text += f"<br>chance {maps['chance']:.4g}" if maps.get("chance") is not None else ""
        return text + f"<br>n = {n} trials" + ("<br><b>named by the verdict</b>" if f"L{layer}H{head}" in named else "")

    hover = [[cell(layer, head) for head in range(mean.shape[1])] for layer in range(mean.shape[0])]
    top = float(np.nanmax(mean)) if np.isfinite(mean).any() else 0.0
    fig = go.Figure(go.Heatmap(z=mean, text=hover, hoverinfo="text", colorscale="Blues", zmin=0,
                               zmax=max(top, 1e-9), colorbar={"title": {"text": "mean"}}, xgap=1, ygap=1))
    fig.update_layout(height=max(260, 22 * mean.shape[0] + 120), margin={"l": 50, "r": 10, "t": 30, "b": 40},
                      xaxis={"title": {"text": "Head"}, "dtick": 1}, yaxis={"title": {"text": "Layer"}, "dtick": 1,
                                                                           "autorange": "reversed"},
                      title={"text": "auto-scaled; hover for values, click a cell for its tokens", "font": {"size": 12}})
    return json.loads(fig.to_json())


def umap_spec(run_dir, meta: dict | None = None) -> dict | None:
    """A plotly scatter of a UMAP run's framed panel (queries and keys, token on hover), or None."""
    import numpy as np
    import plotly.graph_objects as go

    run_dir = Path(run_dir)
    meta = meta or finished_meta(run_dir)
    if not meta or meta.get("experiment") != "geometry-umap":
        return None
    name = next((f for f in meta["outputs"] if f.endswith(".npz")), None)
    if name is None:
        return None
    z = np.load(run_dir / name)
    if "query_tokens" not in z.files:
        return None
    constants = z["constants"].tolist()
    optimum = meta.get("optimum")
    optimum = optimum if isinstance(optimum, (int, float)) and optimum > 0 else None
    c = min(constants, key=lambda x: abs(np.log(x / optimum))) if optimum else (1.0 if 1.0 in constants else constants[0])
    emb, n_q = z[f"c_{c:g}"], int(z["n_queries"])
    fig = go.Figure([
        go.Scatter(x=emb[n_q:, 0], y=emb[n_q:, 1], mode="markers", name="keys",
                   text=[plot_text(t) for t in z["key_tokens"].tolist()],
                   hovertemplate="key: %{text}<extra></extra>", marker={"size": 4, "color": "#d95f02", "opacity": 0.6}),
        go.Scatter(x=emb[:n_q, 0], y=emb[:n_q, 1], mode="markers", name="queries",
                   text=[plot_text(t) for t in z["query_tokens"].tolist()], hovertemplate="query: %{text}<extra></extra>",
                   marker={"size": 4, "color": "#1b9e77", "opacity": 0.6}),
    ])
    cfg = meta["config"]
    fig.update_layout(height=480, margin={"l": 30, "r": 10, "t": 40, "b": 30},
                      title={"text": f"L{int(cfg['layer'])}H{int(cfg['head'])}, c = {c:g}"
                             + (" (optimal)" if optimum else "") + ": hover a point for its token", "font": {"size": 12}},
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False})
    return json.loads(fig.to_json())


class Page:
    """Collects interactive blocks; ``head()`` and ``tail()`` render them with plotly.js embedded once. Every
    piece of data enters the page through :func:`script_json`."""

    def __init__(self):
        self.runs: dict = {}
        self.scripts: list[str] = []

    def add_induction(self, key: str, data: dict, target: str, title: str) -> str:
        """An interactive map of ``target`` from an induction run's view data; returns its HTML block."""
        self.runs.setdefault(key, data["run"])
        i = len(self.scripts)
        spec = heatmap_spec(data["meta"], target)
        self.scripts.append(f"attnlabHeatmap('attnlab-map-{i}', 'attnlab-detail-{i}', {script_json(spec)}, "
                            f"ATTNLAB_RUNS[{script_json(key)}], {script_json(target)}, {script_json(plot_text(title))});")
        query = html.escape(data["run"]["query"])
        return (f"<div class='interactive'><div id='attnlab-map-{i}' class='map'></div>"
                f"<div id='attnlab-detail-{i}' class='detail'><p class='hint'>Click a cell to see that head's "
                f"attention from {query} over the tokens of one trial (pick another, or the trial that contributes most).</p>"
                f"</div></div>")

    def add_umap(self, spec: dict) -> str:
        i = len(self.scripts)
        self.scripts.append(f"Plotly.newPlot('attnlab-umap-{i}', {script_json(spec['data'])}, "
                            f"{script_json(spec['layout'])}, {{displayModeBar: false, responsive: true}});")
        return f"<div class='interactive'><div id='attnlab-umap-{i}' class='umap'></div></div>"

    def head(self) -> str:
        """What goes into <head>: plotly.js and the glue (only when there is something interactive)."""
        if not self.scripts:
            return ""
        return f"<script>{_plotly_js()}</script><script>{_static('view.js')}</script>"

    def document(self, title: str, heading: str, body: list[str]) -> str:
        """A whole page: ``title`` and ``heading`` (escaped here), the ``body`` blocks (HTML), plotly once."""
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}}{STYLE}</style>"
                f"{self.head()}</head><body><h1>{html.escape(heading)}</h1>{''.join(body)}{self.tail()}</body></html>\n")

    def tail(self) -> str:
        if not self.scripts:
            return ""
        return (f"<script>const ATTNLAB_RUNS = {script_json(self.runs)};\nwindow.addEventListener('load', () => {{\n"
                + "\n".join(self.scripts) + "\n});</script>")


def text_attention_page(run_dir, meta: dict) -> str:
    """The page of an ``attention`` run: the tokens as text, coloured by the attention a hovered or clicked token gives
    or receives in the chosen layer and head (linear or log scale). The attention enters as float16 (a drawing
    accurate to 3 significant digits; attention.npz keeps float32)."""
    import numpy as np

    z = np.load(Path(run_dir) / "attention.npz")
    att = z["attention"].astype(np.float16)
    data = {"attention": base64.b64encode(att.tobytes()).decode(), "shape": list(att.shape[:3]),
            "tokens": [str(t) for t in z["tokens"].tolist()]}
    label = model_label(str(meta["config"].get("model", "?")))
    controls = ("<div class='controls'><select class='layer' aria-label='layer'></select> "
                "<select class='head' aria-label='head'></select> <select class='mode' aria-label='direction'>"
                "<option value='given'>attention given by the token</option><option value='received'>attention "
                "received by the token</option></select> <select class='scale' aria-label='scale'><option "
                "value='linear'>linear scale</option><option value='log'>log scale (1e-4 .. 1)</option></select></div>")
    body = (f"<h1>{html.escape(label)}: attention on your text</h1><p class='hint'>Hover a token to colour the others "
            "by the attention it gives (or receives); click it to pin. Darker blue: more attention.</p>"
            f"<div id='attnlab-text'>{controls}<p class='info'></p><div class='tokens'></div></div>")
    style = (STYLE + "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             ".tokens{line-height:2.2;font-size:1.05em}.tok{padding:2px 3px;border-radius:3px;cursor:pointer;"
             "border:1px solid #ddd}.tok.focus{outline:2px solid #d95f02}.info{color:#333;min-height:1.2em}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(label)} - attention on "
            f"text - attnlab</title><style>{style}</style><script>{_static('attention.js')}</script></head><body>{body}"
            f"<script>attnlabTextView('attnlab-text', {script_json(data)});</script></body></html>\n")


STYLE = (".interactive{margin:.5em 0 1.5em}.map{width:100%}.detail{width:100%}.hint{color:#666;font-size:.9em}"
         ".umap{width:100%}.tv-title{font-weight:600;margin:.4em 0}.tv-tokens{line-height:2.1;font-size:.95em;"
         "max-height:26em;overflow-y:auto;border:1px solid #eee;padding:.4em}.tv-tok{padding:1px 2px;border-radius:3px;"
         "border:1px solid transparent}.tv-query{outline:2px solid #d95f02}.tv-target{outline:2px solid #1b9e77}"
         ".tv-other{outline:1px dotted #777}.tv-info{color:#333;margin:.3em 0}")


def write_view(run_dir) -> Path:
    """The page of a folder (``attnlab view``): ``view.html`` of an induction or UMAP run folder or of a mosaic
    folder (every model's interactive map); a report folder's own ``index.html``."""
    run_dir = Path(run_dir)
    if (run_dir / "report.json").is_file() and (run_dir / "index.html").is_file():
        return run_dir / "index.html"  # a report: its page is already complete
    if (run_dir / "mosaic.json").is_file():
        return _write_mosaic_view(run_dir)
    if not (run_dir / "meta.json").exists():
        raise InputError(f"{run_dir} holds no finished run (no meta.json); pass a run folder of `attnlab induction`, "
                         "`attnlab attention` or `attnlab geometry umap`, a mosaic folder or a report folder")
    meta = finished_meta(run_dir)
    if meta is None:
        raise InputError(f"{run_dir} holds no finished, intact run (its meta.json is malformed or an output changed "
                         "since it was written); rerun it with --force")
    try:
        if meta["experiment"] == "attention":
            page_text = text_attention_page(run_dir, meta)
        else:
            page, body = _view_body(run_dir, meta)
            label = model_label(str(meta["config"].get("model", "?")))
            page_text = page.document(f"{label} - {meta['experiment']} - attnlab view", label, body)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as exc:
        raise InputError(f"{run_dir}'s results cannot be shown ({type(exc).__name__}: {exc}); rerun it with "
                         "--force") from None
    out = run_dir / "view.html"
    write_text(out, page_text)
    return out


def _write_mosaic_view(folder: Path) -> Path:
    """``FOLDER/view.html`` of a mosaic: each model's interactive induction map (its own run folder's data)."""
    from attnlab.experiments.jobs import sweep_folders
    from attnlab.induction.experiment import target_words

    mosaic = read_json(folder / "mosaic.json")
    try:
        entries = [e for e in mosaic["entries"] if e.get("status") == "ok"]
        runs = sweep_folders([e["model"] for e in mosaic["entries"]], folder / "models")
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{folder}/mosaic.json is malformed; rerun the mosaic with --force") from None
    page, body = Page(), []
    for i, entry in enumerate(entries):
        label = model_label(str(entry["model"]))
        data = induction_run_data(runs[entry["model"]])
        if data is None:
            body.append(f"<h2>{html.escape(label)}</h2><p class='hint'>its run folder holds no view data; rerun the "
                        "mosaic with --force</p>")
            continue
        target = entry.get("target") or "prev"
        title = f"{label}: {target_words(target, bool(entry.get('causal')))}"
        body.append(f"<h2>{html.escape(title)}</h2>" + page.add_induction(f"m{i}", data, target, title))
    out = folder / "view.html"
    write_text(out, page.document(f"induction mosaic of {len(entries)} models - attnlab view",
                                  "Induction mosaic: each model's map", body))
    return out


def _view_body(run_dir: Path, meta: dict):
    from attnlab.induction.experiment import TARGET_WORDS, target_words

    page, body = Page(), []
    label = model_label(str(meta["config"].get("model", "?")))
    if meta["experiment"] == "induction":
        data = induction_run_data(run_dir, meta)
        if data is None:
            raise InputError(f"{run_dir} was written by an attnlab without the view data; rerun it with --force")
        order = list(TARGET_WORDS)
        for target in sorted(meta["maps"], key=lambda t: order.index(t) if t in order else len(order)):
            title = f"{label}: {target_words(target, bool(meta.get('causal')))}"
            body.append(f"<h2>{html.escape(title)}</h2>" + page.add_induction("run", data, target, title))
    elif meta["experiment"] == "geometry-umap":
        spec = umap_spec(run_dir, meta)
        if spec is None:
            raise InputError(f"{run_dir} was written by an attnlab without token text; rerun it with --force")
        body.append(f"<h2>{html.escape(label)}: joint UMAP of queries and keys</h2>" + page.add_umap(spec))
    else:
        raise InputError(f"{run_dir} holds a '{meta['experiment']}' run; `view` shows induction, attention and UMAP "
                         "runs")
    return page, body


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("view", help="interactive page of a run, mosaic or report folder",
                       description=__doc__.split("Data in the page")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder of `attnlab induction`, `attention` or `geometry umap`; a mosaic "
                                   "folder; or a report folder (its index.html)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print(f"wrote {write_view(args.run_dir)}")
    return 0
