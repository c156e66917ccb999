"""``attnlab icl``: the in-context learning score of a masked LM (the paper's Figure 5), written to a run folder.

The score and its protocols live in :mod:`attnlab.icl.score` (its docstring is this command's help).

Outputs: icl.csv (one row a trial), summary.json, icl_histogram.png, meta.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from attnlab.core.corpus import DEFAULT_CORPUS, load_corpus
from attnlab.core.errors import InputError
from attnlab.core.models import model_label, resolve_model
from attnlab.core.outputs import begin_run, write_csv, write_json
from attnlab.core.provenance import corpus_fingerprint
from attnlab.core.resources import check_fits
from attnlab.experiments.common_args import add_output_args, add_runtime_args, positive_int, print_wrote
# the science lives in attnlab.icl; re-exported here for callers of the old location
from attnlab.icl.score import (  # noqa: F401
    ICL_PROTOCOLS, LONG, PAPER_REPORTED_MEAN, SHORT, ICLResult, compute_icl, draw_trials, icl_trials, tokenize_lengths,
)


@dataclass
class ICLConfig:
    model: str = "bert-base-uncased"
    corpus: str = DEFAULT_CORPUS
    protocol: str = "masked-token"
    trials: int = 50
    seed: int = 0
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.protocol not in ICL_PROTOCOLS:
            raise InputError(f"unknown ICL protocol {self.protocol!r}; use one of {', '.join(ICL_PROTOCOLS)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"trials must be a whole number of at least 1, got {self.trials}")
        # both inputs of every trial ([T, 500] and [T, 50] ids, a few copies) must fit before any is drawn
        per_trial = (LONG + SHORT) * 8 * 4
        check_fits(self.trials * per_trial, f"{self.trials} ICL trials", per_trial, "trials")

ICL_HEADER = ["trial", "article_id", "title", "pos_long", "pos_short", "loss_50", "loss_500", "difference"]


def write_icl(folder, result: ICLResult, docs, cfg: ICLConfig) -> list[str]:
    """icl.csv (one row a trial), summary.json and icl_histogram.png of ``result`` into ``folder``."""
    diff = result.difference
    write_csv(folder / "icl.csv", ICL_HEADER, (
        [i, docs[t.doc_index].id, docs[t.doc_index].title, t.pos_long, t.pos_short, f"{ls:.8g}", f"{ll:.8g}", f"{d:.8g}"]
        for i, (t, ls, ll, d) in enumerate(zip(result.trials, result.loss_short, result.loss_long, diff))))
    summary = {**result.summary(), "model": cfg.model, "corpus": cfg.corpus}
    write_json(folder / "summary.json", summary)
    from attnlab.figures.histogram import icl_histogram

    icl_histogram(diff, summary["mean"], result.ci95, f"Loss({SHORT} tokens) - Loss({LONG} tokens), {len(diff)} "
                  f"trials\n{model_label(cfg.model)}, protocol {cfg.protocol}", folder / "icl_histogram.png",
                  paper_mean=PAPER_REPORTED_MEAN if cfg.protocol == "paper" else None)
    return ["icl.csv", "summary.json", "icl_histogram.png"]


def run_icl(cfg: ICLConfig, out_dir, *, lm=None, docs=None, device="auto", batch_size=None, reuse=True,
            progress=False) -> dict:
    """The ICL score into ``out_dir``; reused when finished with the same config, model and corpus content.
    ``lm``: a loaded masked LM, a loader callable, or None (load ``cfg.model``)."""
    run, config, key, identity, meta = begin_run(out_dir, "icl", cfg, lm, reuse,
                                                 corpus=corpus_fingerprint(cfg.corpus, docs))
    if meta:
        return meta
    t0 = time.perf_counter()
    if docs is None:
        docs = load_corpus(cfg.corpus)
    lm = resolve_model(lm, cfg, device, masked_lm=True)
    identity["model"] = lm.fingerprint
    result = compute_icl(lm, docs, cfg.protocol, cfg.trials, cfg.seed, batch_size, progress)
    write_icl(run.stage(), result, docs, cfg)
    summary = {**result.summary(), "model": cfg.model, "corpus": cfg.corpus}
    return run.commit(key, config, ["icl.csv", "summary.json", "icl_histogram.png"], identity, model=lm.meta,
                      summary=summary, timings={"total_s": round(time.perf_counter() - t0, 3)})


def add_parser(sub) -> None:
    p = sub.add_parser("icl", help="in-context learning score of a masked LM (Figure 5)",
                       description=_description(), formatter_class=_raw())
    p.add_argument("--model", default="bert-base-uncased", help="masked LM: Hub id or folder (default: bert-base-uncased)")
    p.add_argument("--revision", default=None)
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="a .jsonl/.jsonl.gz with a 'text' field, a folder of .txt files, or "
                        f"hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (default: {DEFAULT_CORPUS})")
    p.add_argument("--protocol", default="masked-token", choices=ICL_PROTOCOLS)
    p.add_argument("--trials", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _description() -> str:
    """The command's help: the science module's account of the score and its protocols."""
    from attnlab.icl import score

    return "In-context learning score for masked LMs (the paper's Figure 5).\n" + score.__doc__.split("\n", 1)[1]


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _run(args) -> int:
    cfg = ICLConfig(model=args.model, corpus=args.corpus, protocol=args.protocol, trials=args.trials, seed=args.seed,
                    revision=args.revision, dtype=args.dtype)
    meta = run_icl(cfg, args.out, device=args.device, batch_size=args.batch_size, reuse=not args.force,
                   progress=not args.no_progress)
    s = meta["summary"]
    ci = ("95% CI " + " .. ".join(f"{v:.4f}" for v in s["ci95"])) if None not in s["ci95"] else "no CI: 1 trial"
    print_wrote(meta, args.out, f" - mean {s['mean']:.4f} ({ci}), n={s['n']}, improved in "
                f"{100 * s['share_improved']:.0f}%")
    return 0
