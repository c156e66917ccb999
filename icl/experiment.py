"""The ICL experiment's record and config (``attnlab icl``): torch-free, read by the command line.

Outputs: icl.csv (one row a trial: trial, article_id, title, pos_long, pos_short, loss_50, loss_500,
difference), summary.json, icl_histogram.png, meta.json (with the summary).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.runs import Experiment
from attnlab.induction.experiment import dtype_option, model_option, revision_option

LONG, SHORT = 500, 50
ICL_PROTOCOLS = ("masked-token", "paper")
CORPUS_HELP = ("a .jsonl/.jsonl.gz with a 'text' field, a folder of .txt files, or "
               "hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]")


@dataclass
class ICLConfig:
    model: str = model_option("bert-base-uncased", "masked LM: Hub id or local folder")
    corpus: str = option(DEFAULT_CORPUS, CORPUS_HELP)
    protocol: str = option("masked-token", "masked-token (the masked token's loss) or paper (the notebook's)",
                           choices=ICL_PROTOCOLS)
    trials: int = option(50, "number of trials", minimum=1)
    seed: int = option(0, "random seed (articles, positions, bootstrap)")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        check_fields(self)
        check_icl_fits(self.trials)


def check_icl_fits(trials: int) -> None:
    """Both inputs of every trial ([T, 500] and [T, 50] ids, a few copies) must fit before any is drawn."""
    from attnlab.core.resources import check_fits

    per_trial = (LONG + SHORT) * 8 * 4
    check_fits(trials * per_trial, f"{trials} ICL trials", per_trial, "trials")


def describe(meta: dict) -> list[str]:
    s = meta["summary"]
    ci = ("95% CI " + " .. ".join(f"{v:.4f}" for v in s["ci95"])) if None not in s["ci95"] else "no CI: 1 trial"
    from attnlab.experiments.paper import REPORTED_ICL_MEAN

    paper = f"; the paper reports {REPORTED_ICL_MEAN:g}" if s.get("protocol") == "paper" else ""
    return [f"icl: loss(50) - loss(500) = {s['mean']:.4f} ({ci}), n = {s['n']}, improved in "
            f"{100 * s['share_improved']:.0f}% of trials{paper}"]


def corpus_identity(cfg, ctx) -> dict:
    """The corpus part of a reuse key: the documents passed in, else the file or folder ``cfg.corpus`` names."""
    from attnlab.core.provenance import corpus_fingerprint

    return {"corpus": corpus_fingerprint(cfg.corpus, ctx.docs)}


def prepare_corpus(cfg, ctx) -> None:
    """Load the corpus before the model, so a bad corpus fails first (kept in ``ctx.docs``)."""
    from attnlab.core.corpus import load_corpus

    if ctx.docs is None:
        ctx.docs = load_corpus(cfg.corpus)


def _description() -> str:
    import ast
    from pathlib import Path

    source = (Path(__file__).parent / "score.py").read_text()  # its docstring, without importing torch
    doc = ast.get_docstring(ast.parse(source)) or ""
    return "In-context learning score for masked LMs (the paper's Figure 5).\n\n" + doc.split("\n", 1)[1].strip() \
        + "\n\n" + __doc__.split("\n\n", 1)[1]


ICL = Experiment(
    name="icl",
    config=ICLConfig,
    help="in-context learning score of a masked LM (Figure 5)",
    description=_description(),
    identity=corpus_identity,
    prepare=prepare_corpus,
    compute="attnlab.icl.score:compute",
    save="attnlab.icl.score:save",
    summary="attnlab.icl.score:summary_of",
    plot="attnlab.figures.histogram:plot_icl",
    describe=describe,
    lm_head="required",
)

EXPERIMENTS = [ICL]
