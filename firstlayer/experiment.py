"""The ``decompose`` experiment's record and config (torch-free, read by the command line).

Outputs: classes.csv (per head: class and the numbers that decided it), positional_patterns.npz (pattern
[heads, dest, src], dest_positions, dest_token, method), decomposition.csv (per head and term: mean, std, mean |.|
of the score terms on corpus text), fit.csv (per head: R^2 and max error of the linearised sum against the model's
real scores; the exact sum's max error), normalisers.csv (per head and destination position: mean log Z, its spread
across texts, the effective number of attended tokens, the independent model's prediction), neurons.csv (per MLP
neuron: how well the bag-of-tokens approximation tracks its real pre-activation on held-out text, and the tokens
that push it most each way), positional_patterns.png, offsets.png, meta.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.errors import InputError
from attnlab.core.runs import Experiment
from attnlab.icl.experiment import CORPUS_HELP, corpus_identity, prepare_corpus
from attnlab.induction.experiment import dtype_option, model_option, revision_option


@dataclass
class DecomposeConfig:
    model: str = model_option("gpt2", "Hub id or local folder (gpt2, as in the source)")
    corpus: str = option(DEFAULT_CORPUS, CORPUS_HELP)
    layer: int = option(0, "layer to analyse (the split is exact at layer 0 only)", minimum=0)
    positions: int = option(400, "destination and source positions analysed (at most the model's)", minimum=8)
    dest_token: str = option("the", "the destination token of the positional pattern (a frequent function word)")
    layernorm: str = option("exact", "LayerNorm in the positional pattern: exact (each token's own scale) or linear "
                                     "(the median scale at each position)", choices=("exact", "linear"))
    texts: int = option(16, "corpus texts for the LayerNorm scales, the fit, the normalisers and the bag", minimum=2)
    heldout: int = option(8, "further texts on which the neurons' approximation is checked", minimum=1)
    duplicate_sample: int = option(512, "tokens sampled for the duplicate-token test", minimum=8)
    prev_window: int = option(2, "previous-token class: keys this many positions back", minimum=1)
    prev_min: float = option(0.5, "previous-token class: at least this mass on them")
    prev_max_cv: float = option(0.5, "previous-token class: at most this variation across positions (invariance)")
    context_min_tokens: float = option(8.0, "contextual class: at least this effective number of attended tokens")
    decay_min_r2: float = option(0.8, "contextual class: an exponential decay fits with at least this R^2")
    duplicate_min: float = option(2.0, "duplicate-token class: a token meets itself by at least this many logits more")
    seed: int = option(0, "random seed (the sampled tokens)")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        check_fields(self)
        if not self.dest_token.strip():
            raise InputError("dest_token is empty; give a word, e.g. the")


def describe(meta: dict) -> list[str]:
    classes = meta["classes"]
    by = {}
    for head, kind in classes.items():
        by.setdefault(kind, []).append(head)
    lines = ["decompose: " + "; ".join(f"{kind}: {', '.join(heads)}" for kind, heads in sorted(by.items()))]
    if meta.get("fit"):
        f = meta["fit"]
        lines.append(f"linearised LayerNorm reproduces the real scores with median R^2 {f['median_r2']:.3f} (worst "
                     f"{f['worst_head']} {f['worst_r2']:.3f}); the exact split's max error {f['max_error_exact']:.2g}")
    return lines + [f"note: {n}" for n in meta.get("notes") or []]


DECOMPOSE = Experiment(
    name="decompose", config=DecomposeConfig,
    help="first-layer attention decomposed: positional patterns, head classes, bag of tokens, neurons",
    description=("With absolute positions in the residual stream, a first-layer score splits into token-token, "
                 "token-position, position-token and position-position terms (plus bias terms); with LayerNorm "
                 "exact they sum to the model's scores, linearised (the median scale per position) their fit is "
                 "measured. The positional pattern is the attention a head gives when every token is the same; heads "
                 "are classed previous-token, duplicate-token, contextual or other by stated thresholds; contextual "
                 "heads add a bag of tokens that the first MLP's neurons read. Rotary families get the empirical "
                 "positional pattern only. docs/firstlayer.md.\n\n" + __doc__.split("\n\n", 1)[1]),
    identity=corpus_identity, prepare=prepare_corpus,
    compute="attnlab.firstlayer.analysis:compute", save="attnlab.firstlayer.analysis:save",
    summary="attnlab.firstlayer.analysis:summary", plot="attnlab.figures.firstlayer:plot", describe=describe,
)

EXPERIMENTS = [DECOMPOSE]
