"""The probe experiment's record and config (torch-free, read by the command line): ``attnlab probe``.

Outputs: probe.csv (layer, task, accuracy, ci_low, ci_high, control_accuracy, selectivity, majority, n_train, n_dev),
probe.png (accuracy, control accuracy and selectivity against layer, the majority baseline marked), meta.json (the
labels' source, how words were aligned to tokens, what was dropped, the cost in tokens and seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.errors import InputError
from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.runs import Experiment
from attnlab.icl.experiment import CORPUS_HELP
from attnlab.induction.experiment import dtype_option, model_option, revision_option

CONLLU_TASKS = ("upos", "xpos", "deprel", "head-distance")
BUILTIN_TASKS = ("initial", "capitalised", "numeric", "punctuation", "position", "frequency")
PROBES = ("linear", "rank", "mlp")


@dataclass
class ProbeConfig:
    model: str = model_option("bert-base-uncased")
    labels: str = option("builtin:capitalised", "conllu:FILE (a Universal Dependencies file) or builtin:TASK on a "
                                                "plain-text corpus (" + ", ".join(BUILTIN_TASKS) + ")", required=True)
    task: str = option("upos", "conllu: the label (" + ", ".join(CONLLU_TASKS) + ")", choices=CONLLU_TASKS)
    corpus: str = option(DEFAULT_CORPUS, "builtin: the plain-text corpus: " + CORPUS_HELP)
    pool: str = option("first", "a word's representation: its first sub-word token, or the mean of its tokens",
                       choices=("first", "mean"))
    probe: str = option("linear", "linear (multinomial logistic regression, scikit-learn), rank (a rank-limited "
                                  "linear probe) or mlp (one hidden layer)", choices=PROBES)
    rank: int = option(1, "rank of the rank-limited probe", minimum=1)
    hidden: int = option(64, "width of the MLP probe's hidden layer", minimum=1)
    c: float = option(1.0, "inverse regularisation strength (scikit-learn's C; weight decay 1/C for the others)")
    layers: str = option("all", "layers to probe (0: the embeddings), e.g. 0-3 or 0,6")
    max_tokens: int = option(50000, "probe at most this many words (units), sentences in order", minimum=10)
    sentences: int = option(2000, "builtin: corpus sentences to read at most", minimum=2)
    dev_share: float = option(0.2, "share of sentences held out for evaluation")
    seed: int = option(0, "random seed (split, control labels, bootstrap, probe initialisation)")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        check_fields(self)
        kind, _, rest = self.labels.partition(":")
        if kind not in ("conllu", "builtin") or not rest:
            raise InputError(f"labels {self.labels!r}: give conllu:FILE or builtin:TASK, e.g. builtin:capitalised")
        if kind == "builtin" and rest not in BUILTIN_TASKS:
            raise InputError(f"unknown builtin task {rest!r}; use one of {', '.join(BUILTIN_TASKS)}")
        if not 0 < self.dev_share < 1:
            raise InputError(f"dev_share must lie between 0 and 1, got {self.dev_share}")
        if not self.c > 0:
            raise InputError(f"c must be > 0, got {self.c}")


def describe(meta: dict) -> list[str]:
    rows = meta["layers"]
    best = max(rows, key=lambda r: r["selectivity"])
    cost = meta["cost"]
    return [f"probe {meta['task']}: best selectivity at layer {best['layer']} (accuracy {best['accuracy']:.3f} "
            f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}], control {best['control_accuracy']:.3f}, majority "
            f"{best['majority']:.3f})",
            f"cost: {cost['units']} words from {cost['sentences']} sentences ({cost['tokens']} tokens), "
            f"{cost['seconds']:.1f} s; dropped {meta['dropped']}"]


def _identity(cfg: ProbeConfig, ctx) -> dict:
    from attnlab.core.provenance import corpus_fingerprint, file_digest

    kind, _, rest = cfg.labels.partition(":")
    if kind == "conllu":
        from pathlib import Path

        if not Path(rest).is_file():
            raise InputError(f"CoNLL-U file {rest} does not exist; pass a Universal Dependencies .conllu file")
        return {"labels": "file:" + file_digest(rest)}
    return {"corpus": corpus_fingerprint(cfg.corpus, ctx.docs)}


def _prepare(cfg: ProbeConfig, ctx) -> None:
    """The labels' source read before the model: a malformed CoNLL-U file or a bad corpus fails first."""
    if cfg.labels.startswith("builtin:"):
        if ctx.docs is None:
            from attnlab.core.corpus import load_corpus

            ctx.docs = load_corpus(cfg.corpus)
    else:
        from attnlab.probes.labels import conllu_sentences

        ctx.extra["sentences"] = conllu_sentences(cfg.labels.partition(":")[2], cfg.task)


PROBE = Experiment(
    name="probe", config=ProbeConfig,
    help="probing classifiers per layer, with a control task (selectivity)",
    description=("A probing classifier per layer (embeddings included) on the hidden states of one forward pass: "
                 "train/dev split by sentence, accuracy with a bootstrap 95% CI over dev sentences, the control task's "
                 "accuracy (each word type a random label with the real labels' distribution; Hewitt and Liang 2019), "
                 "selectivity = accuracy - control accuracy, and the majority-class baseline. Labels from a Universal "
                 "Dependencies CoNLL-U file (parsed by the conllu package; words aligned to their first sub-word token, "
                 "or the mean of their tokens) or computed from plain text (builtin tasks). docs/probes.md.\n\n"
                 + __doc__.split("\n\n", 1)[1]),
    identity=_identity, prepare=_prepare,
    compute="attnlab.probes.analysis:compute", save="attnlab.probes.analysis:save",
    summary="attnlab.probes.analysis:summary", plot="attnlab.figures.probes:plot", describe=describe,
)

EXPERIMENTS = [PROBE]
