"""The main job's report sections beyond the paper: the first layer decomposed, pattern and message projections,
the heads' copying and causal evidence, attention and the logit lens on a sentence, and Figure 9 across sizes.

Each section but the last is started right after the job whose run it reads (its run computed, its figures queued
for the plot worker) and built later, once its run is committed (:func:`start_sections`), so that drawing one overlaps
computing the next. The runner is :class:`attnlab.experiments.reproduce.Runner`.
"""

from __future__ import annotations

from pathlib import Path

from attnlab.core.errors import AttnlabError
from attnlab.core.names import model_label


REPORT_ORDER = ("firstlayer", "patterns", "heads", "attention", "lens")  # the sections' order in the report


def start_sections(runner, job: str) -> dict:
    """The report's sections beyond the paper that read ``job``'s run, started now that it has started (computed,
    their figures queued for the plot worker) and built later: returns ``{name: zero-argument builder}`` (names in
    :data:`REPORT_ORDER`). Starting each right after the job it reads lets its drawing overlap the remaining jobs'
    computing, and it uses the model that job has just loaded. After Figure 7's job they start in this order: the
    one with the most drawing and least computing first (the attention grids), the heads' long computation last."""
    results = runner.context["results"]
    if job not in results:
        return {}
    if job == "geometry_scaling":
        return {"firstlayer": _firstlayer_section(runner)}
    if job == "induction_standard":
        attention, lens = _text_sections(runner)
        patterns = _patterns_section(runner)
        return {"attention": attention, "lens": lens, "patterns": patterns, "heads": _heads_section(runner)}
    return {}


def _deferred(runner, experiment: str, cfg, out: Path, loader, build, error):
    """A section started now and built later: ``build(meta)`` once the run is committed, ``error(exc)`` if
    starting or finishing it failed with an attnlab error. Returns the zero-argument builder."""
    try:
        pending = runner.start_record(experiment, cfg, out, loader)
    except AttnlabError as exc:
        failure = exc  # the name in the except clause is unbound when it ends
        return lambda: error(failure)

    def done() -> dict:
        try:
            meta = pending.result()
        except AttnlabError as exc:
            return error(exc)
        return build(meta)

    return done


def _named_cells(meta: dict, target: str) -> list[tuple[int, int]]:
    return [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in meta["verdict"][target]["heads"]]


def sizes_section(settings, sizes) -> dict:
    """Figure 9 as one figure: every size's map of the previous instance at relative depth, one colour scale."""
    import numpy as np

    from attnlab.figures.heatmap import small_multiples

    panels = [(model_label(model), np.array([[np.nan if v is None else v for v in row]
                                             for row in meta["maps"]["prev"]["mean"]])) for model, meta in sizes]
    small_multiples(panels, "Figure 9 across model sizes: attention from [MASK] to the previous instance",
                    settings.out / "figures" / "figure9.png", outlines=[_named_cells(m, "prev") for _, m in sizes],
                    outline_note="outlined: the heads each model's verdict names")
    return {"title": "Figure 9 across sizes", "job": "figure9-sizes", "image": "figures/figure9.png",
            "text": "The panels of Figure 9 side by side: layers at their relative depth, one colour scale for all "
                    "models, the heads each model's verdict names outlined (none when no head passes the rule)."}


def _heads_section(runner):
    """Beyond the paper: is an induction-like head also a copying head, and does the model use it? (A builder,
    see :func:`_deferred`.)"""
    from attnlab.circuits.experiment import HeadsConfig

    meta7 = runner.context["results"]["induction_standard"]
    model = meta7["config"]["model"]
    s = runner.settings
    # the ablation scan is the cost here (144 heads x a pass over both versions of every trial on bert-base):
    # 8 trials of n = 30 keep it near a minute on a 2-core CPU; `attnlab heads` defaults to 16 of n = 50
    cfg = HeadsConfig(model=model, trials=2 if s.quick else 8, seq_len=20 if s.quick else 30, ablation=not s.quick,
                      dtype=s.dtype)
    return _deferred(runner, "heads", cfg, s.out / "runs" / "heads", lambda: runner.cache.best(model),
                     lambda meta: _heads_text(runner, meta7, meta),
                     lambda exc: {"title": "Induction heads: copying and causal evidence", "error": str(exc)})


def _heads_text(runner, meta7: dict, meta: dict) -> dict:
    s = runner.settings
    model = meta7["config"]["model"]
    top = meta["top_heads"].get("induction_at_mask") or []
    rows = [(f"L{a}H{b}", f"{v:.3f}") for a, b, v in top[:5]]
    named = meta7["verdict"]["prev"]["heads"]
    ours = [f"L{a}H{b}" for a, b, _ in top[:3]]
    if named:
        agree = (f" The induction map (Figure 7a, paper protocol) names {', '.join(named)}; the strongest heads here "
                 f"are {', '.join(ours)}" + (" - the same." if set(ours[:len(named)]) & set(named) else
                                             " - they differ (other trials, sequence length and protocol)."))
    else:
        agree = (" The induction map (Figure 7a) names no head (no lift over the null passes the rule); the ranking "
                 "below is relative only.")
    from attnlab.circuits.experiment import describe_heads

    all_notes = meta.get("notes") or []
    notes = " ".join(n for n in all_notes if not n.startswith("paths:"))  # why the story is not coloured
    traced = [line for line in describe_heads(meta) if " path into " in line]
    traced += [n.removeprefix("paths: ") for n in all_notes if n.startswith("paths:")]
    paths = f" Path patching (which earlier heads feed its keys and queries): {'; '.join(traced)}." if traced else ""
    chance = meta.get("chance", {}).get("induction_at_mask")
    return {"title": "Induction heads: copying and causal evidence (beyond the paper)", "job": "heads",
            "image": f"runs/heads/{meta['figures']['story']}" if "story" in meta.get("figures", {}) else None,
            "rows": rows, "header": ["head", "induction at [MASK] minus chance"],
            "text": f"{model_label(model)}: per head, attention from the [MASK] to the previous instance of the masked "
                    f"token - the same definition as Figure 7a's map, minus chance ({chance:.3g} here) - (x) against the "
                    "OV copying score (y)" + (f"; not coloured: {notes}" if notes else
                                               ", coloured by direct logit attribution at the [MASK] (--quick skips the "
                                               "ablation scan)" if s.quick else ", coloured by how much zeroing the head "
                                               "alone changes the in-context copying gain of the rrt task (blue: the "
                                               "model uses it)") + "." + agree + paths
                    + " Full scores: runs/heads/heads.csv, composition.csv, paths.csv (when traced), heads.png."}


def _firstlayer_section(runner):
    """Beyond the paper: the first layer of the gpt2 role's model decomposed from its weights (a builder)."""
    from attnlab.firstlayer.experiment import DecomposeConfig

    s = runner.settings
    model = runner.context["results"]["geometry_scaling"]["config"]["model"]
    cfg = DecomposeConfig(model=model, corpus=s.corpus, positions=128 if s.quick else 400, texts=6 if s.quick else 16,
                          heldout=3 if s.quick else 8, seed=s.seed, dtype=s.dtype)
    title = "First-layer attention, decomposed (beyond the paper)"
    return _deferred(runner, "decompose", cfg, s.out / "runs" / "firstlayer", lambda: runner.cache.get(model, False),
                     lambda meta: _firstlayer_text(runner, cfg, meta, title),
                     lambda exc: {"title": title, "job": "firstlayer", "error": str(exc)})


def _firstlayer_text(runner, cfg, meta: dict, title: str) -> dict:
    s = runner.settings
    model, stand_in = cfg.model, runner.context["substituted"].get("gpt2")
    classes = list(csv_rows(s.out / "runs" / "firstlayer" / "classes.csv"))
    rows = [(f"L{r['layer']}H{r['head']}", r["class"], r["prev_mass"], r["n_eff"], r["decay_left"] or "-",
             r["duplicate_logit"] or "-") for r in classes]
    fit = meta.get("fit")
    text = (f"{model_label(model)}" + (f" (offline stand-in for {s.models['gpt2']}: a BERT encoder, so the patterns are "
                                       "two-sided; not the source's GPT-2)" if stand_in else "")
            + f", layer {cfg.layer}: each head's positional pattern - the attention it gives when every token is "
            f"'{meta['dest_token']}' - and the class its numbers decide (thresholds in meta.json). "
            + (f"With LayerNorm linearised the token/position terms reproduce the real scores with median R^2 "
               f"{fit['median_r2']:.3f} (worst {fit['worst_head']} {fit['worst_r2']:.3f}). " if fit else "")
            + " ".join(meta.get("notes") or []) + " Full tables: runs/firstlayer/.")
    return {"title": title, "job": "firstlayer", "image": f"runs/firstlayer/{meta['figures']['patterns']}",
            "header": ["head", "class", "previous-token mass", "effective tokens", "decay length", "duplicate logit"],
            "rows": rows, "text": text}


def csv_rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


SENTENCE = "The cat sat on the mat because it was tired."


def _text_sections(runner) -> list:
    """Beyond the paper: the bert role's attention on a sentence (which head links "it" to "cat"?) and its logit
    lens on the same sentence (needs the LM head). Two builders."""
    from attnlab.text.experiment import AttentionConfig, LensConfig

    s = runner.settings
    model = runner.context["results"]["induction_standard"]["config"]["model"]
    title = "Attention on a sentence: which head links \"it\" to \"cat\"? (beyond the paper)"

    def attention(meta: dict) -> dict:
        f = meta["finder"]
        rows = [(h["head"], f"{h['value']:.3f}", str(h["rank"])) for h in f["heads"][:5]]
        return {"title": title, "job": "attention", "rows": rows,
                "header": ["head", "attention from 'it' to 'cat'", "rank among its keys"],
                "image": "runs/attention/" + meta["figures"]["L%d" % f["heads"][0]["layer"]],
                "text": f"{model_label(model)} on \"{SENTENCE}\": every head ranked by the attention from \"it\" "
                        f"(position {f['from_index']}) to \"cat\" (position {f['to_index']}); uniform attention "
                        f"over the {meta['n_tokens']} tokens would give {f['chance']:.3f}. The interactive page "
                        "with the tokens as text: runs/attention/attention.html; every layer's grid: "
                        "runs/attention/attention_L<l>.png."}

    lens_title = "The logit lens on the same sentence (beyond the paper)"

    def lens(meta: dict) -> dict:
        kl = meta["kl_by_layer"]["logit"]
        return {"title": lens_title, "job": "lens", "image": f"runs/lens/{meta['figures']['lens']}",
                "text": f"{model_label(model)}: each layer's residual stream at a masked position read through the "
                        f"model's own LM head ({meta['unembedding']}); mean KL to the final distribution by layer: "
                        + ", ".join(f"{v:.2f}" for v in kl) + " nats. Tables: runs/lens/lens.csv."}

    return [_deferred(runner, "attention", AttentionConfig(model=model, text=SENTENCE, source="it", target="cat",
                                                          dtype=s.dtype),
                      s.out / "runs" / "attention", lambda: runner.cache.get(model, False), attention,
                      lambda exc: {"title": title, "job": "attention", "error": str(exc)}),
            _deferred(runner, "lens", LensConfig(model=model, text=SENTENCE, dtype=s.dtype), s.out / "runs" / "lens",
                      lambda: runner.cache.get(model, True), lens,
                      lambda exc: {"title": lens_title, "job": "lens", "error": str(exc)})]


PATTERN_WORDS = ("dog", "river", "run", "happy")


def _patterns_section(runner):
    """Beyond the paper: pattern/message projections of a few words through the strongest heads of Figure 7a (a
    builder)."""
    from attnlab.geometry.experiment import PatternsConfig

    meta7 = runner.context["results"]["induction_standard"]
    model = meta7["config"]["model"]
    heads = [(h["layer"], h["head"]) for h in meta7["top_heads"]["prev"][:3]]
    layers = ",".join(str(layer) for layer in sorted({layer for layer, _ in heads}))
    cfg = PatternsConfig(model=model, words=PATTERN_WORDS, layers=layers, top_k=5, dtype=runner.settings.dtype)
    return _deferred(runner, "patterns", cfg, runner.settings.out / "runs" / "patterns",
                     lambda: runner.cache.get(model, False), lambda meta: _patterns_text(meta7, heads, meta),
                     lambda exc: {"title": "Pattern and message projections", "error": str(exc)})


def _patterns_text(meta7: dict, heads: list, meta: dict) -> dict:
    model = meta7["config"]["model"]
    top = meta["top_tokens"]  # {word: {kind: {"L<l>H<h>": [tokens]}}}
    rows = [(word, f"L{layer}H{head}", ", ".join(top[word]["pattern"].get(f"L{layer}H{head}", [])),
             ", ".join(top[word]["message"].get(f"L{layer}H{head}", [])))
            for word in PATTERN_WORDS for layer, head in heads]
    named = set(meta7["verdict"]["prev"]["heads"])
    which = ("the verdict names them induction heads" if named and all(f"L{a}H{b}" in named for a, b in heads) else
             "ranked by mean attention only - the verdict names " + (", ".join(sorted(named)) or "no head"))
    return {"title": "Pattern and message projections (beyond the paper)", "job": "patterns", "rows": rows,
            "image": f"runs/patterns/{meta['figures']['patterns']}",
            "model": model, "header": ["word", "head", "pattern: looks for (top 5)", "message: writes (top 5)"],
            "text": f"{model_label(model)}: the three heads with the strongest attention to the previous instance "
                    f"(Figure 7a; {which}). Pattern p = x W_Q W_K^T, what the head looks for when the word is the "
                    "query; message m = x W_V W_O, what it writes when it attends to the word; nearest vocabulary "
                    "tokens by cosine. Full tables: runs/patterns/patterns.md.",
            "reused": bool(meta.get("reused"))}
