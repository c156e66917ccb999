"""The report of ``attnlab reproduce``: the same content as ``README.md`` (Markdown) and ``index.html``."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone

from attnlab.core.outputs import write_text


@dataclass
class FigureResult:
    id: str
    caption: str
    job: str
    role: str
    model: str
    path: str | None = None  # relative to the report, when produced
    error: str | None = None  # why not, when not
    meta: dict | None = None
    comparison: list = field(default_factory=list)  # [(quantity, paper, ours)]


def _title(figure_id: str) -> str:
    return figure_id.replace("figure", "Figure ", 1)


def _run_time(meta: dict) -> str:
    seconds = (meta.get("timings") or {}).get("total_s")
    text = f"{seconds:.1f} s" if seconds is not None else "?"
    return f"reused (first run took {text})" if meta.get("reused") else text


def _model_rows(results) -> list[tuple]:
    rows, seen = [], set()
    for r in results:
        if r.meta is None or (r.role, r.model) in seen:
            continue
        seen.add((r.role, r.model))
        m = r.meta.get("model") or {}
        rows.append((r.role, r.model, m.get("source", ""), m.get("revision") or "-"))
    for r in results:  # roles whose runs failed still appear, with the id asked for
        if r.meta is None and (r.role, r.model) not in seen:
            seen.add((r.role, r.model))
            rows.append((r.role, r.model, "not loaded", "-"))
    return rows


def _sections(settings, results, total_s, versions):
    """Report content as plain data: (title, kind, payload) blocks rendered by both writers."""
    produced = [r for r in results if r.error is None]
    mode = "quick smoke run (--quick: few trials, not comparable with the paper)" if settings.quick else \
        "full run with the paper's settings"
    head = [
        f"{len(produced)} of {len(results)} figures produced; {mode}.",
        f"Total run time {total_s:.1f} s; written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "Layers and heads are 0-based (L9H0 = layer 9, head 0). The paper's numbers are those it reports; ours "
        "come from this run's scores.csv / summary.json / meta.json under runs/.",
    ]
    blocks = [("attnlab: the paper's figures, reproduced", "text", head)]
    comparisons = [(r.id, q, p, o) for r in produced for q, p, o in r.comparison]
    if comparisons:
        blocks.append(("Compared with the paper", "table", (["figure", "quantity", "paper", "this run"], comparisons)))
    failed = [r for r in results if r.error]
    if failed:
        blocks.append(("Not produced", "table", (["figure", "model", "reason"],
                                                [(r.id, f"{r.role} = {r.model}", r.error) for r in failed])))
    for r in results:
        blocks.append((r.id, "figure", r))
    blocks.append(("Models", "table", (["role", "asked for", "loaded from", "revision"], _model_rows(results))))
    settings_rows = [("seed", str(settings.seed)), ("corpus (ICL, geometry)", settings.corpus),
                     ("device / dtype", f"{settings.device} / {settings.dtype}"),
                     ("command", settings.command)]
    settings_rows += [(f"version: {k}", v) for k, v in versions.items()]
    blocks.append(("Provenance", "table", (["setting", "value"], settings_rows)))
    return blocks


def _figure_lines_md(r: FigureResult) -> list[str]:
    lines = [f"## {_title(r.id)}", ""]
    if r.error:
        return lines + [f"**Not produced** ({r.role} = `{r.model}`): {r.error}", ""]
    lines += [f"![{r.id}]({r.path})", "", r.caption, "",
              f"Model `{r.model}` (role {r.role}); run folder `runs/{r.job}`; run time {_run_time(r.meta)}.", ""]
    return lines


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks) -> str:
    lines = []
    for title, kind, payload in blocks:
        if kind == "text":
            lines += [f"# {title}", ""] + [p + "\n" for p in payload]
        elif kind == "table":
            header, rows = payload
            lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""]
        else:
            lines += _figure_lines_md(payload)
    return "\n".join(lines) + "\n"


def to_html(blocks) -> str:
    e = html.escape
    body = []
    for title, kind, payload in blocks:
        if kind == "text":
            body.append(f"<h1>{e(title)}</h1>" + "".join(f"<p>{e(p)}</p>" for p in payload))
        elif kind == "table":
            header, rows = payload
            body.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                        + "</table>")
        else:
            r = payload
            if r.error:
                body.append(f"<h2 id='{e(r.id)}'>{e(_title(r.id))}</h2><p class='err'><b>Not produced</b> "
                            f"({e(r.role)} = <code>{e(r.model)}</code>): {e(r.error)}</p>")
            else:
                body.append(f"<h2 id='{e(r.id)}'>{e(_title(r.id))}</h2><figure><img src='{e(r.path)}' alt='{e(r.id)}'>"
                            f"<figcaption>{e(r.caption)}<br><small>Model <code>{e(r.model)}</code> (role {e(r.role)});"
                            f" run folder <code>runs/{e(r.job)}</code>; run time {e(_run_time(r.meta))}.</small>"
                            "</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}.err{color:#a00}figcaption{margin-top:.4em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>attnlab report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def write_report(settings, results, *, total_s: float, versions: dict) -> None:
    blocks = _sections(settings, results, total_s, versions)
    write_text(settings.out / "README.md", to_markdown(blocks))
    write_text(settings.out / "index.html", to_html(blocks))
