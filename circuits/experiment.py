"""Records and configs of the circuits experiments (torch-free, read by the command line):
``attnlab heads`` (weight, pattern and causal scores of every head) and ``attnlab ablate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.errors import InputError
from attnlab.core.runs import Experiment
from attnlab.icl.experiment import CORPUS_HELP, check_icl_fits
from attnlab.induction.experiment import dtype_option, end_sep_option, model_option, revision_option

MODES = ("zero", "mean", "resample")
TASKS = ("rrt", "icl")


def _check_rrt_fits(trials: int, seq_len: int, copies: int, what: str) -> None:
    from attnlab.core.resources import check_fits

    per_trial = (2 * seq_len + 2) * 8 * copies
    check_fits(trials * per_trial, what, per_trial, "trials")


@dataclass
class HeadsConfig:
    model: str = model_option("bert-base-uncased")
    trials: int = option(16, "rrt trials: the [MASK] detector, DLA and the ablation scan", minimum=2)
    detector_trials: int = option(4, "sequences whose full attention maps feed the other detectors", minimum=1)
    seq_len: int = option(50, "length n of the random block", minimum=3)
    end_sep: bool = end_sep_option()
    ablation: bool = option(True, "skip the per-head ablation scan", flag="--no-ablation")
    paths: int = option(2, "trace the key and query paths into the N strongest induction-like heads (induction score "
                        "at least 0.1 over chance; 0: none)", minimum=0)
    seed: int = option(0, "random seed")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        check_fields(self)
        _check_rrt_fits(self.trials, self.seq_len, 8, f"{self.trials} rrt trials of n = {self.seq_len}")


@dataclass
class AblationConfig:
    model: str = model_option("bert-base-uncased", "a model with its LM head (masked or causal): Hub id or local "
                              "folder")
    heads: str = option("", "heads to ablate together, e.g. L9H0,L10H9")
    scan: bool = option(False, "ablate every head alone (task rrt)")
    mode: str = option("zero", "zero, or mean (each head's mean output over a reference batch)",
                       choices=MODES[:2])
    task: str = option("rrt", "rrt (copying gain) or icl (the ICL score)", choices=TASKS)
    trials: int = option(50, "trials", minimum=2)
    seq_len: int = option(200, "rrt: length n of the random block", minimum=3)
    end_sep: bool = end_sep_option()
    corpus: str = option(DEFAULT_CORPUS, "icl: " + CORPUS_HELP)
    seed: int = option(0, "random seed")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        if self.mode not in MODES[:2]:
            raise InputError(f"mode {self.mode!r} is not available here; use zero or mean (resample: the Python API)")
        if not isinstance(self.heads, str):
            raise InputError(f"heads must be a string such as 'L9H0,L10H9', got {self.heads!r}")
        if self.scan == bool(self.heads.strip()):
            raise InputError("give either heads (e.g. L9H0,L10H9) or scan, not both and not neither")
        if self.scan and self.task != "rrt":
            raise InputError("scan runs the rrt task (its prefix reuse needs one fixed batch); use task rrt")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 2:
            raise InputError(f"trials must be at least 2 (a confidence interval needs two), got {self.trials}")
        check_fields(self)
        if self.task == "rrt":
            _check_rrt_fits(self.trials, self.seq_len, 8, f"{self.trials} rrt trials of n = {self.seq_len}")
        else:
            check_icl_fits(self.trials)


def describe_heads(meta: dict) -> list[str]:
    top = meta.get("top_heads", {})
    lines = []
    for name, words in (("induction_at_mask", "induction at [MASK] (minus chance)"),
                        ("prefix_matching", "prefix matching (minus chance)"), ("ov_copying", "OV copying")):
        if top.get(name):
            lines.append(f"{words}: " + ", ".join(f"L{a}H{b} {v:.3g}" for a, b, v in top[name][:3]))
    comp = meta.get("top_composition") or []
    if comp:
        c = comp[0]
        lines.append(f"strongest composition: {c['from']} -> {c['to']} ({c['kind']}, {c['corrected']:.3g} over chance)")
    for receiver, paths in (meta.get("feeders") or {}).items():
        for path, entry in paths.items():
            best = entry["strongest"]
            named = ", ".join(entry["named"]) or "none named"
            lines.append(f"{path} path into {receiver}: {named} (strongest {best['sender']} removes {best['lost']:.1%} "
                         f"of its attention to the target, 95% CI {best['ci_low']:.1%} .. {best['ci_high']:.1%}"
                         + alone_clause(entry.get("most_sufficient")) + ")")
    return lines + [f"note: {n}" for n in meta.get("notes") or []]


def alone_clause(row) -> str:
    """"; alone in its layer, ..." for a paths row (the sender that restores most), where its layer carries the path;
    "" otherwise."""
    if not row or not isinstance(row["restored"], float) or row["restored"] != row["restored"]:
        return ""  # NaN (None once saved): its layer carries too little for a share of it to mean anything
    return (f"; alone in its layer, {row['sender']} restores {row['restored']:.0%} of the {row['layer_lost']:.0%} "
            f"its layer carries, 95% CI {row['restored_ci_low']:.0%} .. {row['restored_ci_high']:.0%}")


def describe_ablation(meta: dict) -> list[str]:
    lines = [f"  {r['metric']}: {r['baseline']} -> {r['ablated']} (delta {r['delta']}, 95% CI {r['ci_low']} .. "
             f"{r['ci_high']})" for r in meta.get("effects") or []]
    for metric, rows in (meta.get("largest_effects") or {}).items():
        lines.append(f"  {metric}: largest effects " + ", ".join(f"{r['head']} {r['delta']:+.3g}" for r in rows[:3]))
    return lines


def _ablation_identity(cfg: AblationConfig, ctx) -> dict:
    from attnlab.icl.experiment import corpus_identity

    return corpus_identity(cfg, ctx) if cfg.task == "icl" else {"corpus": "-"}


def _ablation_prepare(cfg: AblationConfig, ctx) -> None:
    if cfg.task == "icl":
        from attnlab.icl.experiment import prepare_corpus

        prepare_corpus(cfg, ctx)


HEADS = Experiment(
    name="heads", config=HeadsConfig,
    help="weight, pattern and causal scores of every head (heads.csv, story.png)",
    description="""Weight-based, pattern-based and causal scores of every head.

heads.csv (layer, head, score, value), one row per head and score:
    ov_copying                 sum(eig)/sum(|eig|) of the full OV circuit W_E W_V W_O W_U, with the model's own
                               unembedding (meta.json says which)
    <detector>                 attention-pattern detectors on clean RRT sequences X X with one [MASK], each minus
                               the share uniform attention over the keys visible in that layer would give (0 =
                               chance; empty where a sliding-window layer never sees the template):
                               previous_token, next_token, self, duplicate_token, prefix_matching, suffix_matching,
                               cls, sep, mask at the unmasked queries; induction_at_mask at the [MASK] (the
                               induction map's "previous instance" target)
    dla                        direct logit attribution to the masked token at the [MASK] (BERT-style masked LMs)
    ablation_copying_gain      change of the rrt copying gain when the head alone is zeroed (masked LMs)
composition.csv (layer1, head1, layer2, head2, kind, score, baseline, baseline_se, corrected): Q/K/V composition of
every earlier head with every later head, the random-matrix baseline subtracted.
paths.csv (receiver, sender, path, clean, patched, lost, ci_low, ci_high, top_trial_share, layer_lost, restored,
restored_ci_low, restored_ci_high, restored_top_trial_share, named_by, named): composition measured in the forward
pass, for the strongest induction-like heads (decoders: prefix matching; masked LMs: induction at the [MASK]): the
share of the receiver's attention to its induction target lost when each earlier head is ablated on the receiver's
keys (K) or queries (Q) alone, with a bootstrap CI over trials; the share the sender's whole layer carries
(layer_lost) and the share of it the sender restores alone, the rest of its layer ablated (finds feeders that back
each other up, which ablating one at a time misses); meta.json's feeders name, per receiver and path, the heads the
stated rule names, as necessary, sufficient or both (weight-based composition cannot see through LayerNorm, MLPs or
rotary positions).
heads.png: one layers x heads map per score. story.png (after Olsson et al.): per head, induction at [MASK] (x)
against OV copying (y), coloured by the ablation delta (else DLA).""",
    check="attnlab.circuits.heads:check", compute="attnlab.circuits.heads:compute", save="attnlab.circuits.heads:save",
    summary="attnlab.circuits.heads:summary", plot="attnlab.figures.heads:plot", describe=describe_heads,
    lm_head="optional",
)

ABLATE = Experiment(
    name="ablate", config=AblationConfig,
    help="ablate heads (or scan every head) and measure a task",
    description="""Does the model *use* a head? Ablate it and measure a task.

Tasks: rrt: the in-context copying gain (masked LMs: cross-entropy of a token masked in the second copy's control
- the same position with the first copy redrawn - minus in the second copy; decoders: next-token loss on the
first copy minus the second), the second copy's cross-entropy and top-1 accuracy; icl: the ICL score (masked-token protocol: loss
with 50 tokens of context minus with 500). Modes: zero, or mean (each head's mean output over a reference batch:
fresh RRT trials with another seed for rrt, the 500-token contexts for icl).

Outputs: ablation.csv (layer, head, mode, task, metric, baseline, ablated, delta, ci_low, ci_high; the CI is a
paired bootstrap over trials of ablated - baseline), with --scan one row per head and metric plus
ablation_<metric>.png (layers x heads map of the delta), meta.json.""",
    identity=_ablation_identity, prepare=_ablation_prepare,
    check="attnlab.circuits.effects:check", compute="attnlab.circuits.effects:compute",
    save="attnlab.circuits.effects:save", summary="attnlab.circuits.effects:summary",
    plot="attnlab.figures.heads:plot_ablation", describe=describe_ablation, lm_head="required",
)

EXPERIMENTS = [HEADS, ABLATE]
