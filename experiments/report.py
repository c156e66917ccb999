"""The report of ``attnlab reproduce``: built once as data (blocks), rendered twice (``README.md``, ``index.html``)."""

from __future__ import annotations

import base64
import html
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from attnlab.core.names import is_embedded, model_label
from attnlab.core.outputs import atomic_path, write_text
from attnlab.experiments.paper import ROLES as PAPER_MODELS


@dataclass
class FigureResult:
    id: str
    caption: str
    job: str
    role: str
    model: str  # the role's model, as asked for
    path: str | None = None  # relative to the report, when produced
    error: str | None = None  # why not, when not
    meta: dict | None = None
    comparison: list = field(default_factory=list)  # [(quantity, paper, ours)]
    model_used: str | None = None  # the model that made it (differs from ``model`` when substituted)
    substituted: bool = False
    paper_image: str | None = None
    unavailable: bool = False  # not produced because no model at hand can make it
    earlier: bool = False  # kept from an earlier run into the same folder (not run this time)
    target: str | None = None  # induction figures: the target whose map this is

    def record(self) -> dict:
        """What report.json keeps (everything but the run's meta, which lives in its run folder)."""
        out = asdict(self)
        out.pop("meta")
        return out


def _title(figure_id: str) -> str:
    return figure_id.replace("figure", "Figure ", 1)


def _run_time(meta: dict) -> str:
    seconds = (meta.get("timings") or {}).get("total_s")
    text = f"{seconds:.1f} s" if seconds is not None else "?"
    return f"reused (first run took {text})" if meta.get("reused") else text


def _model_rows(results) -> list[tuple]:
    """role | paper's model | model used | layers x heads | MLM head | loaded from | revision."""
    rows, seen = [], set()
    for r in results:
        if r.role in seen:
            continue
        done = [x for x in results if x.role == r.role and x.meta is not None]
        seen.add(r.role)
        if not done:
            rows.append((r.role, PAPER_MODELS.get(r.role, r.model), "none (not loaded)", "-", "-", "-", "-"))
            continue
        used = {}
        for x in done:  # a role can use its own model for some figures and a stand-in for none, or all
            used.setdefault(x.model_used, x.meta.get("model") or {})
        for name, m in used.items():
            shape = f"{m.get('layers', '?')} x {m.get('heads', '?')}"
            if m.get("masked_lm"):
                head = "yes"
            elif is_embedded(name):
                head = "no (a sentence encoder)"
            else:
                head = "not loaded (not needed)"
            rows.append((r.role, PAPER_MODELS.get(r.role, r.model),
                         model_label(name) + (" (stand-in)" if name != r.model else ""), shape, head,
                         m.get("source", ""), m.get("revision") or "-"))
    return rows


def _banner(settings, substituted: dict, given: dict) -> list[str]:
    lines = []
    if given:
        parts = [f"{role} = {model_label(model)} (paper: {PAPER_MODELS.get(role, '?')})" for role, model in given.items()]
        lines.append("Models given with --model: " + "; ".join(parts) + ". The figures are comparable with the "
                     "paper only where these are the paper's checkpoints.")
    if substituted:
        stands = sorted({model_label(m) for m in substituted.values()})
        roles = ", ".join(PAPER_MODELS.get(role, role) for role in sorted(substituted))
        lines.append(f"Offline: embedded {' and '.join(stands)} stands in for {roles}; those figures are not "
                     "comparable with the paper.")
    if settings.quick:
        lines.append("Quick smoke run (--quick: few trials, clean induction protocol); not comparable with the paper.")
    return lines


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _top_table(r: FigureResult):
    """(header, rows, note) of the strongest heads of an induction figure, each with what qualifies it, or None."""
    meta = r.meta or {}
    top = (meta.get("top_heads") or {}).get(r.target)
    if not top:
        return None
    n = meta.get("n_trials", meta.get("config", {}).get("trials", "?"))
    chance = (meta.get("maps") or {}).get(r.target, {}).get("chance")
    rows = [(f"L{h['layer']}H{h['head']}", _fmt(h["mean"]), _fmt(h["sem"]), f"{_fmt(h['ci'][0])} .. {_fmt(h['ci'][1])}",
             _fmt(chance, ".4g"), _fmt(h["null"]), _fmt(h["lift"]), _fmt(h["top_trial_share"], ".2f"),
             "yes" if h["named"] else "no") for h in top[:5]]
    v = meta["verdict"][r.target]
    note = f"Verdict rule: {v['rule']}. {n} trials; chance = uniform attention over the keys the query sees."
    share = meta.get("share_r0")
    if share:
        note += (f" {share:.0%} of the trials are the paper protocol's r = 0 case (the mask on the last token of the "
                 "first copy, so the 'previous instance' is the leading [SEP]).")
    return (["head", "mean attention", "SEM", "95% CI", "chance", "null", "lift", "top-trial share", "named"], rows,
            note)


def _verdict_rows(results) -> list[tuple]:
    """The report's first table: every induction figure's verdict, with its baseline."""
    from attnlab.induction.experiment import target_words
    from attnlab.induction.scores import turned_away

    rows = []
    for r in results:
        if r.error or not r.target or not (r.meta or {}).get("verdict"):
            continue
        v = r.meta["verdict"][r.target]
        if v["named"]:
            found = ", ".join(f"{e['head']} ({e['mean']:.3g}, lift {e['lift']:.3g})" for e in v["named"][:5])
        else:
            st = v["strongest"]
            found = f"none - strongest {st['head']} {_fmt(st['mean'], '.4g')} (null {_fmt(st['null'], '.4g')})"
        found += turned_away(v)
        rows.append((r.id, model_label(r.model_used or r.model), target_words(r.target, bool(r.meta.get("causal"))),
                     found, _fmt(v["chance"], ".4g")))
    return rows


def _sections(settings, results, total_s, versions, substituted, advice, extra, given):
    """Report content as plain data: (title, kind, payload) blocks rendered by both writers."""
    ran = [r for r in results if not r.earlier]
    produced = [r for r in results if r.error is None]
    if settings.quick:
        mode = "quick smoke run"
    elif substituted or given:
        mode = "full settings, with models other than the paper's (see the banner)"
    else:
        mode = "full run with the paper's settings and models"
    head = [
        f"{len(produced)} of {len(results)} figures produced; {mode}.",
        f"Total run time {total_s:.1f} s; written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."
        + (f" {len(results) - len(ran)} figures are kept from an earlier run into this folder." if len(ran) < len(results) else ""),
        "Layers and heads are 0-based (L9H0 = layer 9, head 0). The paper's numbers are those it reports; ours "
        "come from this run's results under runs/.",
    ]
    blocks = [("attnlab: the paper's figures, reproduced", "text", head)]
    banner = _banner(settings, substituted, given)
    if banner:
        blocks.append(("Not comparable with the paper", "banner", banner))
    toc = [(r.id, _title(r.id) + ("" if r.error is None else " (not produced)")) for r in results]
    toc += [(s.get("job", "section"), s["title"]) for s in extra]
    blocks.append(("Contents", "toc", toc))
    verdicts = _verdict_rows(produced)
    if verdicts:
        from attnlab.induction.scores import VERDICT_RULE

        blocks.append(("Induction heads: the verdict", "table",
                       (["figure", "model", "target", "induction heads named (mean, lift over the null)", "chance"],
                        verdicts)))
        blocks.append(("How a head is named", "text", [
            "A head is named an induction head for a target when it is " + VERDICT_RULE.format(
                min_lift=next((r.meta["config"].get("min_lift", 0.1) for r in produced if r.target), 0.1))
            + ". Chance is what uniform attention over the keys the query can see puts on one key; the null is the "
            "same head's attention to the same positions on control sequences whose earlier copy is replaced by "
            "fresh tokens (no repeat), so lift is what the repeat itself buys. Ranks by mean attention alone (the "
            "paper's convention, in the tables below) do not name heads."]))
    comparisons = [(r.id, q, p, o) for r in produced for q, p, o in r.comparison]
    if comparisons:
        blocks.append(("Compared with the paper", "table", (["figure", "quantity", "paper", "this run"], comparisons)))
    failed = [r for r in results if r.error]
    if failed:
        grouped: dict = {}
        for r in failed:
            grouped.setdefault(r.error, []).append(r)
        blocks.append(("Not produced", "table", (["figures", "model asked for", "reason"], [
            (", ".join(r.id for r in rs), ", ".join(dict.fromkeys(r.model for r in rs)), reason)
            for reason, rs in grouped.items()])))
        if advice:
            blocks.append(("How to supply missing weights", "text", [advice]))
    for r in results:
        blocks.append((r.id, "figure", r))
    for s in extra:
        blocks.append((s["title"], "section", s))
    blocks.append(("Models", "table", (["role", "paper's model", "model used", "layers x heads", "MLM head",
                                        "loaded from", "revision"], _model_rows(results))))
    settings_rows = [("seed", str(settings.seed)), ("corpus (ICL, geometry)", settings.corpus),
                     ("geometry protocol", getattr(settings, "geometry_protocol", "text")),
                     ("device / dtype", f"{settings.device} / {settings.dtype}"),
                     ("command", settings.command)]
    settings_rows += [(f"version: {k}", v) for k, v in versions.items()]
    blocks.append(("Provenance", "table", (["setting", "value"], settings_rows)))
    return blocks


def _run_links(r: FigureResult) -> list[tuple[str, str]]:
    files = list((r.meta or {}).get("outputs", [])) + ["meta.json"]
    wanted = [f for f in files if not f.endswith(".png")]
    return [(f, f"runs/{r.job}/{f}") for f in wanted]


def _md(text) -> str:
    """Prose for README.md: model names, tokens, captions and errors are data, so HTML in them is escaped (a markdown
    renderer would otherwise render it)."""
    return html.escape(str(text), quote=False)


def _code(text) -> str:
    """A code span that no backtick in ``text`` can close early."""
    return "`" + str(text).replace("`", "'") + "`"


def _figure_lines_md(r: FigureResult, paper_dir: str | None) -> list[str]:
    lines = [f"## {_title(r.id)}", ""]
    if r.error:
        return lines + [f"**Not produced** ({r.role} = {_code(r.model)}): {_md(r.error)}", ""]
    lines += [f"![{r.id}]({r.path})", "", _md(r.caption), ""]
    if paper_dir and r.paper_image:
        lines += [f"Paper's figure: ![paper {r.id}]({paper_dir}/{r.paper_image})", ""]
    elif r.paper_image:
        lines += [f"Paper's image: {_code(r.paper_image)}.", ""]
    top = _top_table(r)
    if top:
        header, rows, note = top
        lines += _md_table(header, rows) + ([_md(note), ""] if note else [])
    links = ", ".join(f"[{_md(name)}]({href})" for name, href in _run_links(r))
    used = model_label(r.model_used or r.model)
    lines += [f"Model {_code(used)}{' (stand-in for ' + _code(r.model) + ')' if r.substituted else ''} (role {r.role}); "
              f"run folder {_code('runs/' + r.job)} ({links}); run time {_run_time(r.meta)}"
              + ("; kept from an earlier run" if r.earlier else "") + ".", ""]
    return lines


def _md_cell(text) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows) -> list[str]:
    return (["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""])


def to_markdown(blocks, paper_dir=None) -> str:
    lines = []
    for title, kind, payload in blocks:
        if kind == "text":
            level = "#" if not lines else "##"
            lines += [f"{level} {_md(title)}", ""] + [_md(p) + "\n" for p in payload]
        elif kind == "banner":
            lines += [f"> **{_md(title)}.** " + " ".join(_md(p) for p in payload), ""]
        elif kind == "toc":
            lines += ["## Contents", ""] + [f"- [{_md(text)}](#{anchor})" for anchor, text in payload] + [""]
        elif kind == "table":
            header, rows = payload
            lines += [f"## {_md(title)}", ""] + _md_table(header, rows)
        elif kind == "section":
            lines += [f"## {_md(title)}", ""]
            if payload.get("error"):
                lines += [f"**Not produced**: {_md(payload['error'])}", ""]
            else:
                lines += [_md(payload["text"]), ""]
                if payload.get("image"):
                    lines += [f"![{_md(title)}]({payload['image']})", ""]
                if payload.get("rows"):
                    lines += _md_table(payload["header"], payload["rows"])
        else:
            lines += _figure_lines_md(payload, paper_dir)
    return "\n".join(lines) + "\n"


def _html_table(header, rows) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _interactive(r: FigureResult, page, root) -> str:
    """The interactive block of a figure (induction map or UMAP), or '' when there is none."""
    if page is None or root is None or r.meta is None:
        return ""
    from attnlab.experiments import view

    run_dir = Path(root) / "runs" / r.job
    if r.meta.get("experiment") == "induction" and r.target:
        data = view.induction_run_data(run_dir)
        if data is None:
            return ""
        return page.add_induction(r.job, data, r.target, f"{_title(r.id)} ({model_label(r.model_used or r.model)})")
    if r.meta.get("experiment") == "geometry-umap":
        spec = view.umap_spec(run_dir)
        return page.add_umap(spec) if spec else ""
    return ""


def _img(src: str, alt: str, root) -> str:
    """An <img>: with ``root`` (the report folder) the PNG is embedded as a data URI, so index.html shows every
    image when copied alone; the PNG files stay beside it for other documents."""
    e = html.escape
    path = Path(root) / src if root is not None else None
    if path is not None and path.is_file() and path.suffix.lower() == ".png":
        data = base64.b64encode(path.read_bytes()).decode()
        return f"<img src='data:image/png;base64,{data}' alt='{e(alt)}' data-file='{e(src)}'>"
    return f"<img src='{e(src)}' alt='{e(alt)}'>"


def _alt(title: str, caption: str) -> str:
    """Alt text that says what a figure shows: its title and the caption's first sentences (about 300 characters)."""
    text = f"{title}: {' '.join(caption.split())}"
    return text if len(text) <= 300 else text[:297].rsplit(" ", 1)[0] + "..."


def _figure_html(r: FigureResult, paper_dir: str | None, page=None, root=None) -> str:
    e = html.escape
    anchor = f"<h2 id='{e(r.id)}'>{e(_title(r.id))}</h2>"
    if r.error:
        return anchor + (f"<p class='err'><b>Not produced</b> ({e(r.role)} = <code>{e(r.model)}</code>): "
                         f"{e(r.error)}</p>")
    ours = (f"<figure>{_img(r.path, _alt(_title(r.id), r.caption), root)}<figcaption>{e(r.caption)}</figcaption>"
            "</figure>")
    if paper_dir and r.paper_image:
        alt = f"The paper's own {_title(r.id)}, for comparison with ours above ({r.paper_image})"
        paper = (f"<figure>{_img(f'{paper_dir}/{r.paper_image}', alt, root)}"
                 f"<figcaption>The paper's figure ({e(r.paper_image)})</figcaption></figure>")
        body = f"<div class='pair'>{ours}{paper}</div>"
    else:
        body = ours + (f"<p><small>Paper's image: <code>{e(r.paper_image)}</code></small></p>" if r.paper_image else "")
    body += _interactive(r, page, root)
    top = _top_table(r)
    if top:
        header, rows, note = top
        body += "<p><b>Strongest heads by mean attention</b> (the paper's ranking), each with its baseline</p>" + _html_table(header, rows) + (f"<p class='note'>{e(note)}</p>" if note else "")
    links = ", ".join(f"<a href='{e(href)}'>{e(name)}</a>" for name, href in _run_links(r))
    used = model_label(r.model_used or r.model)
    stand = f" (stand-in for {e(r.model)})" if r.substituted else ""
    body += (f"<p><small>Model <code>{e(used)}</code>{stand} (role {e(r.role)}); run folder "
             f"<a href='runs/{e(r.job)}/'>runs/{e(r.job)}</a>: {links}; run time {e(_run_time(r.meta))}"
             + ("; kept from an earlier run" if r.earlier else "") + ".</small></p>")
    return anchor + body


def to_html(blocks, paper_dir=None, root=None, page_title: str = "attnlab report") -> str:
    """index.html; with ``root`` (the report folder) the induction maps and UMAPs are interactive too and every
    image is embedded (the page is complete when copied alone)."""
    from attnlab.experiments.view import STYLE, Page

    e = html.escape
    page = Page() if root is not None else None
    body = []
    for title, kind, payload in blocks:
        if kind == "text":
            tag = "h1" if not body else "h2"
            body.append(f"<{tag}>{e(title)}</{tag}>" + "".join(f"<p>{e(p)}</p>" for p in payload))
        elif kind == "banner":
            body.append(f"<div class='banner' role='note'><b>{e(title)}.</b> " + " ".join(e(p) for p in payload)
                        + "</div>")
        elif kind == "toc":
            body.append("<nav><h2>Contents</h2><ol>" + "".join(f"<li><a href='#{e(a)}'>{e(t)}</a></li>"
                                                               for a, t in payload) + "</ol></nav>")
        elif kind == "table":
            header, rows = payload
            body.append(f"<h2>{e(title)}</h2>" + _html_table(header, rows))
        elif kind == "section":
            body.append(f"<h2 id='{e(payload.get('job', 'section'))}'>{e(title)}</h2>")
            if payload.get("error"):
                body.append(f"<p class='err'><b>Not produced</b>: {e(payload['error'])}</p>")
            else:
                body.append(f"<p>{e(payload['text'])}</p>")
                if payload.get("image"):
                    body.append(f"<figure>{_img(payload['image'], _alt(title, payload['text']), root)}</figure>")
                if payload.get("rows"):
                    body.append(_html_table(payload["header"], payload["rows"]))
        else:
            body.append(_figure_html(payload, paper_dir, page, root))
    style = STYLE + ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}.err{color:#a00}figcaption{margin-top:.4em}.note{color:#555}"
             ".banner{background:#fff4d6;border:2px solid #e0a800;border-radius:6px;padding:.8em 1em;margin:1em 0}"
             ".pair{display:grid;grid-template-columns:1fr;gap:1em}nav ol{columns:3}"
             "td{overflow-wrap:anywhere}")
    head, tail = (page.head(), page.tail()) if page else ("", "")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(page_title)}</title>"
            f"<style>{style}</style>{head}</head><body>{''.join(body)}{tail}</body></html>\n")


def _copy_paper_figures(settings, results) -> str | None:
    """Copy the paper's images named by the figures into DIR/paper/ (so the report stays self-contained)."""
    folder = getattr(settings, "paper_figures", None)
    if not folder:
        return None
    src = Path(folder)
    copied = False
    for r in results:
        if r.paper_image and (src / r.paper_image).is_file():
            with atomic_path(settings.out / "paper" / r.paper_image) as tmp:
                shutil.copyfile(src / r.paper_image, tmp)
            copied = True
    return "paper" if copied else None


def write_report(settings, results, *, total_s: float, versions: dict, substituted: dict | None = None,
                 advice: str | None = None, sections: list | None = None, given: dict | None = None) -> None:
    paper_dir = _copy_paper_figures(settings, results)
    blocks = _sections(settings, results, total_s, versions, substituted or {}, advice, sections or [], given or {})
    write_text(settings.out / "README.md", to_markdown(blocks, paper_dir))
    used = sorted({model_label(r.model_used or r.model) for r in results if r.meta is not None})
    title = "attnlab report: the paper's figures" + (f" with {', '.join(used)}" if used else "")
    write_text(settings.out / "index.html", to_html(blocks, paper_dir, root=settings.out, page_title=title))
