"""``attnlab train`` and ``attnlab dynamics``: model organisms trained here, and how their induction heads form.

    attnlab train --recipe induction-causal --out runs/organism
    attnlab dynamics --checkpoints runs/organism --out runs/organism-dynamics

The science is in ``attnlab.organisms``; this module parses arguments, loads the corpus and writes the outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from attnlab.core.config import option
from attnlab.core.corpus import DEFAULT_CORPUS


@dataclass
class TrainConfig:
    recipe: str = option("induction-causal", "what to train (docs/organisms.md): induction-causal, "
                         "induction-mlm, smoke, smoke-mlm")
    corpus: str = option(DEFAULT_CORPUS, "text to mix with the repeated spans: a .jsonl/.jsonl.gz with a 'text' "
                         "field, a folder of .txt files or hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (offline: the shared "
                         "Simple Wikipedia file when it sits beside the checkout)")
    seed: int = option(0, "random seed (initial weights and every batch)")


def _texts(corpus: str) -> tuple[list[str], str, str]:
    """(texts, digest, the spec read) of a corpus; the default Hub corpus falls back to the shared file offline."""
    from attnlab.core.corpus import load_corpus, offline_default
    from attnlab.core.provenance import corpus_fingerprint

    spec = offline_default(corpus)
    local = Path(spec).expanduser()
    if local.exists():  # recorded in meta.json, where `dynamics` reads it back from any working folder
        spec = str(local.resolve())
    docs = load_corpus(spec)
    return [d.text for d in docs], corpus_fingerprint(spec, docs), spec


def run_train(args) -> int:
    from attnlab.core.config import config_from_args
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import train

    cfg = config_from_args(TrainConfig, args)
    recipe = get_recipe(cfg.recipe)  # before the corpus is read
    texts, digest, spec = _texts(cfg.corpus)
    try:
        meta = train(recipe, args.out, texts, digest, seed=cfg.seed, progress=not args.no_progress, corpus=spec)
    except KeyboardInterrupt:
        import sys

        state = Path(args.out) / "state" / "training.pt"
        where = " (its state and a checkpoint are saved)" if state.is_file() else ""
        print(f"attnlab train: interrupted{where}; the same command resumes", file=sys.stderr)
        return 130
    m = meta["final_metrics"]
    reused = " (already trained: reused)" if meta.get("reused") else ""
    print(f"train {recipe.name}{reused}: step {m['step']}, held-out text loss {m['text_loss']:.3f}, repeated-token "
          f"loss {m['rrt_loss_second']:.3f} (first copy {m['rrt_loss_first']:.3f}), copying gain "
          f"{m['copying_gain']:.3f}, top-1 on the second copy {m['rrt_acc_second']:.2f}")
    print(f"wrote {args.out}: {len(meta['checkpoints'])} checkpoints (checkpoints/), curves.csv, curves.png, meta.json")
    if recipe.objective == "mlm" and not recipe.sep_end:
        print("note: its training sequences never ended in [SEP]; measure it as trained with --no-end-sep "
              "(induction, ablate, heads; dynamics does so itself)")
    return 0


def run_dynamics(args) -> int:
    from attnlab.core.config import config_from_args
    from attnlab.organisms.dynamics import measure
    from attnlab.organisms.recipes import DynamicsConfig

    cfg = config_from_args(DynamicsConfig, args)
    meta = measure(Path(args.checkpoints), Path(args.out), cfg, progress=not args.no_progress)
    formed = meta["formed_at"]
    last = meta["rows"][-1]
    print(f"dynamics: {len(meta['rows'])} checkpoints; " + (
        f"the induction head forms at step {formed}" if formed is not None else "no induction head forms")
        + f" ({meta['rule']}); at step {last['step']}: {last['induction_head']} lift {last['induction_score']:.3f}, "
        f"previous-token {last['previous_token_head']} {last['previous_token']:.3f}, copying gain "
        f"{last['copying_gain']:.3f}, ICL score {last['icl_score']:.3f}")
    print(f"wrote {args.out}: dynamics.csv, dynamics.png, meta.json")
    return 0


def _out_args(parser, help_out: str) -> None:
    parser.add_argument("--out", required=True, help=f"{help_out} (required)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines (default: off)")


def add_parser(sub) -> None:
    import argparse

    from attnlab.core.config import add_config_args

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a small model that forms induction heads (a model organism)",
                       formatter_class=fmt, description=(
                           "Train a small transformer here, on the CPU, on text mixed with repeated spans of random\n"
                           "tokens, and save Hugging Face checkpoints at log-spaced steps (every attnlab command\n"
                           "loads them). Seeded runs are identical; Ctrl-C keeps the last checkpoint and the same\n"
                           "command resumes."))
    add_config_args(p, TrainConfig)
    _out_args(p, "output folder: checkpoints/, curves, meta.json (a rerun resumes or reuses it)")
    p.set_defaults(func=run_train)
    p = sub.add_parser("dynamics", help="measure every checkpoint of a trained organism: how the induction head forms",
                       formatter_class=fmt, description=(
                           "For every checkpoint of `attnlab train`: the strongest induction head's lift, the\n"
                           "previous-token score, the copying gain, the ICL score and the loss on repeated tokens;\n"
                           "one figure against training steps (log scale) with the formation step marked."))
    p.add_argument("--checkpoints", required=True,
                   help="a folder written by `attnlab train` (its checkpoints/ are measured) (required)")
    from attnlab.organisms.recipes import DynamicsConfig

    add_config_args(p, DynamicsConfig)
    _out_args(p, "output folder: dynamics.csv, dynamics.png, meta.json")
    p.set_defaults(func=run_dynamics)



# ---------------------------------------------------------------- the main job's organism sections

ORGANISM_RECIPE = "induction-causal"


def organism_folder(explicit: str | None = None) -> Path:
    """Where the main job looks for a trained organism: ``explicit``, else ``$ATTNLAB_CACHE`` (default
    ``~/.cache/attnlab``) ``/organisms/induction-causal``."""
    import os

    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("ATTNLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnlab")
    return Path(root) / "organisms" / ORGANISM_RECIPE


def organism_line(sections: list[dict]) -> str | None:
    """The console's one line on the organism sections: the induction verdict (a section's ``summary``), or why
    they were not produced; None when there are none."""
    mine = [s for s in sections if s.get("job") == "organism"]
    if not mine:
        return None
    if mine[0].get("summary"):
        return mine[0]["summary"]
    if any(not s.get("error") for s in mine):  # the map failed, a later section (the dynamics) did not
        return f"organism section {mine[0]['title']!r} not produced: {mine[0]['error']}"
    return f"organism sections not produced: {mine[0]['error']}"


def organism_sections(runner, folder: Path) -> list[dict]:
    """The report's organism sections: the induction map and verdict of the trained organism's last checkpoint
    with the ablation of its heads, and its dynamics. A trained organism is used when ``folder`` holds a finished
    run of the recipe with this seed and corpus under this attnlab (its identity); training one takes 5-9 minutes
    on 2 cores (309 s and 508 s measured alone on two machines), more than the main job should add, so otherwise the
    section names the command."""
    from attnlab.core.errors import AttnlabError
    from attnlab.core.outputs import read_json
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import checkpoint_name, identity

    s = runner.settings
    title = "A model organism: an induction head trained here (beyond the paper)"
    recipe = get_recipe(ORGANISM_RECIPE)
    command = f"attnlab train --recipe {ORGANISM_RECIPE} --seed {s.seed} --corpus {s.corpus} --out {folder}"
    try:
        _, digest, _ = _texts(s.corpus)
    except AttnlabError as exc:
        return [{"title": title, "job": "organism", "error": f"its corpus cannot be read ({exc})"}]
    meta = read_json(folder / "meta.json")
    if not meta or not meta.get("finished") or meta.get("identity") != identity(recipe, s.seed, digest):
        return [{"title": title, "job": "organism", "error": (
            f"no trained organism of this recipe, seed, corpus and training code at {folder}. Training one takes 5-9 "
            f"minutes on a 2-core CPU; run `{command}` and then rerun this command")}]
    final = folder / "checkpoints" / checkpoint_name(recipe.steps)
    sections = []
    forming = "The organism's induction head forming during training"
    for make, name in ((lambda: _organism_map(runner, final, title), title),
                       (lambda: _organism_dynamics(runner, folder), forming)):
        try:  # one section that cannot be made is listed as such; it never costs the rest of the main job
            sections.append(make())
        except AttnlabError as exc:
            sections.append({"title": name, "job": "organism", "error": str(exc)})
    return sections


def _organism_map(runner, final: Path, title: str) -> dict:
    from attnlab.circuits.experiment import AblationConfig, HeadsConfig, alone_clause
    from attnlab.circuits.paths import FEEDER_RULE
    from attnlab.induction.experiment import InductionConfig
    from attnlab.induction.scores import verdict_line

    s = runner.settings
    n, trials = 30, (16 if s.quick else 50)
    meta = runner.run_record("induction", InductionConfig(model=str(final), seq_len=n, trials=trials, seed=s.seed),
                             s.out / "runs" / "organism_induction", lambda: runner.cache.get(str(final), True))
    verdict = meta["verdict"]["after"]
    said = verdict_line("after", verdict)  # in the section's text and on the console
    runner.run_record("ablate", AblationConfig(model=str(final), scan=True, trials=trials, seq_len=n,
                                                          seed=s.seed),
                                 s.out / "runs" / "organism_ablate", lambda: runner.cache.get(str(final), True))
    heads = runner.run_record("heads", HeadsConfig(model=str(final), trials=trials, seq_len=n, ablation=False, paths=1,
                                                   seed=s.seed),
                              s.out / "runs" / "organism_heads", lambda: runner.cache.get(str(final), True))
    roles = {h: "induction head (verdict)" for h in verdict["heads"]}
    feeding = []
    for receiver, paths in (heads.get("feeders") or {}).items():
        for path, entry in paths.items():
            for sender in entry["named"]:
                roles[sender] = ", ".join(filter(None, [roles.get(sender), f"feeds {receiver}'s "
                                                        f"{'keys' if path == 'K' else 'queries'}"]))
            best = entry["strongest"]
            feeding.append(f"{path} path into {receiver}: {', '.join(entry['named']) or 'no head'} named (strongest "
                           f"{best['sender']}, {best['lost']:.0%} of its attention to the target lost, 95% CI "
                           f"{best['ci_low']:.0%} .. {best['ci_high']:.0%}"
                           f"{alone_clause(entry.get('most_sufficient'))})")
    comp = verdict["heads"] and _strongest_k_composition(s.out / "runs" / "organism_heads" / "composition.csv",
                                                         verdict["heads"][0])
    base, deltas = _ablation_table(s.out / "runs" / "organism_ablate" / "ablation.csv")
    rows = [(head, f"{d:.3f}", f"{-d / base:.0%}" if base > 0 else "n/a", roles.get(head, ""))
            for head, d in deltas[:5]]
    paths_text = (" Which earlier heads feed it, by path patching (each layer-0 head ablated on the induction head's "
                  "keys or queries alone, and kept alone with the rest of layer 0 ablated; " + FEEDER_RULE + "): "
                  + "; ".join(feeding) + "." if feeding else
                  " No head passed the induction-score threshold for path patching.")
    if comp:
        paths_text += " " + _k_composition_text(verdict["heads"][0], comp)
    text = (f"{final.parent.parent.name}: a 2-layer GPT-NeoX trained here by `attnlab train --recipe "
            f"{ORGANISM_RECIPE}` (a small model, not a published checkpoint), step {int(final.name[5:])}. Its induction map "
            f"({trials} trials of BOS X X, |X| = {n}; target: the token after the previous instance, which a causal "
            f"induction head attends to): {said}. Zeroing one head at a time, the in-context "
            f"copying gain (loss on the first copy minus the second; {base:.3f} nats unablated) falls most for the heads "
            "below." + paths_text + " Full tables: runs/organism_induction, runs/organism_ablate, runs/organism_heads.")
    image = f"runs/organism_induction/{meta['figures']['after']}"
    return {"title": title, "job": "organism", "image": image, "text": text, "rows": rows,
            "header": ["head zeroed", "change in copying gain (nats)", "share of the gain removed", "role"],
            "summary": f"{ORGANISM_RECIPE} (a small model trained here) verdict: {said}"}


def _strongest_k_composition(path: Path, receiver: str) -> tuple[str, float] | None:
    """(sender, baseline-corrected score) of the highest weight-based K-composition into ``receiver`` ("LxHy") in a
    ``heads`` run's ``composition.csv``; None when it has no such row."""
    rows = [(f"L{r['layer1']}H{r['head1']}", float(r["corrected"])) for r in _csv_rows(path)
            if r["kind"] == "K" and f"L{r['layer2']}H{r['head2']}" == receiver]
    return max(rows, key=lambda r: r[1]) if rows else None


def _k_composition_text(receiver: str, comp: tuple[str, float]) -> str:
    """The sentence on the strongest weight-based K-composition ``(sender, baseline-corrected score)`` into
    ``receiver``: a head is ranked first only when it is above its random baseline."""
    sender, corrected = comp
    where = f"Weight-based K-composition into {receiver}, which cannot see through LayerNorm and rotary positions,"
    if corrected > 0:
        return f"{where} ranks {sender} first ({corrected:.3g} over its random baseline)."
    return (f"{where} puts no earlier head above its random baseline (the highest, {sender}, is {corrected:.3g} from "
            "it).")


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _ablation_table(path: Path) -> tuple[float, list]:
    rows = [r for r in _csv_rows(path) if r["metric"] == "copying_gain"]
    base = float(rows[0]["baseline"]) if rows else float("nan")
    deltas = sorted(((f"L{r['layer']}H{r['head']}", float(r["delta"])) for r in rows), key=lambda x: x[1])
    return base, deltas


def _organism_dynamics(runner, folder: Path) -> dict:
    from attnlab.core.outputs import read_json
    from attnlab.organisms.dynamics import code_identity, measure
    from attnlab.organisms.recipes import DynamicsConfig

    s = runner.settings
    out = s.out / "runs" / "organism_dynamics"
    meta = read_json(out / "meta.json")
    train_meta = read_json(folder / "meta.json")
    cfg = DynamicsConfig(trials=8 if s.quick else 32, seq_len=30, seed=s.seed)
    # reused when it measured this organism with these settings and this measuring code
    if (not meta or meta.get("train_identity") != train_meta.get("identity") or meta.get("config") != asdict(cfg)
            or meta.get("code") != code_identity() or s.force):
        meta = measure(folder, out, cfg)
    formed = meta["formed_at"]
    last = meta["rows"][-1]
    return {"title": "The organism's induction head forming during training", "job": "organism_dynamics",
            "image": "runs/organism_dynamics/dynamics.png",
            "text": ("Every checkpoint of the organism measured by attnlab itself: the strongest induction head's lift, "
                     "the strongest previous-token head, the copying gain, the ICL score (loss at positions 8-23 "
                     "minus 96-127 of held-out training-distribution sequences) and the loss on repeated tokens, against training steps. "
                     + (f"The induction head forms at step {formed}" if formed is not None else
                        "No induction head forms") + f" ({meta['rule']}). At the last step: {last['induction_head']} "
                     f"lift {last['induction_score']:.3f}, previous-token {last['previous_token_head']} "
                     f"{last['previous_token']:.3f}, copying gain {last['copying_gain']:.3f}.")}
