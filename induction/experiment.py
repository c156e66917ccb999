"""The induction experiment's record and config (``attnlab induction``): torch-free, read by the command line.

Outputs of one run, in its output directory:
    scores.csv   tidy: model, variant, protocol, target, layer, head, mean, sem, ci_low, ci_high, chance,
                 null_mean, lift, top_trial_share, named, n_trials, share_r0
    trials.npz   input_ids [T,S], null_input_ids [T,S], mask_index [T], target_index_<t> [T],
                 attention_<t> [T,L,H], null_attention_<t> [T,L,H], chance [T], quirk [T], view rows
    meta.json    config, model, reuse key, the maps, the verdict per target, top heads, timings
    induction_<variant>_<target>.png   one heatmap per target, the named heads outlined
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.errors import InputError
from attnlab.core.runs import Experiment

PROTOCOLS = ("clean", "paper")
DTYPES = ("float32", "bfloat16", "float16")
MIN_LIFT = 0.1


def model_option(default: str | None, text: str = "Hub id or local folder"):
    return option(default, text, required=default is None)


def revision_option():
    return option(None, "Hub revision (branch, tag or commit); Hub ids only")


def dtype_option():
    return option("float32", "model dtype", choices=DTYPES)


def end_sep_option():
    return option(True, "masked LMs: leave out the random-token sequences' final [SEP] ([CLS] X X, protocol clean), "
                        "for a model trained without an end marker", flag="--no-end-sep")


@dataclass
class InductionConfig:
    model: str = model_option("bert-base-uncased")
    variant: str = option("standard", "RRT variant (list them with `attnlab variants`)")
    protocol: str = option("clean", "token protocol: clean (every target well defined) or paper (replicates its "
                                    "code; what `reproduce` uses)", choices=PROTOCOLS)
    end_sep: bool = end_sep_option()
    trials: int = option(50, "number of random sequences", minimum=1)
    seq_len: int | None = option(None, "length n of the random block X", minimum=3,
                                 show_default="200; triple 150")
    seed: int = option(0, "random seed (trials, null and bootstrap)")
    min_lift: float = option(MIN_LIFT, "the verdict names a head when its lift over the null is at least this")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                         or self.seq_len < 3):
            raise InputError(f"seq_len must be at least 3 (a masked token needs both neighbours), got {self.seq_len}")
        check_fields(self)
        if not self.end_sep and self.protocol == "paper":
            raise InputError("end_sep=False leaves out the clean protocol's final [SEP]; protocol 'paper' has none "
                             "(its [SEP] leads the sequence) - use protocol 'clean'")
        if not 0 < self.min_lift <= 1:
            raise InputError(f"min_lift must be a number in (0, 1], got {self.min_lift!r}")


PROTOCOL_NOTES = {
    "clean": "clean protocol: [CLS] X X [SEP], distinct ordinary tokens, mask never at a copy's edge",
    "paper": "paper protocol: the paper's code, quirks included (leading [SEP], ids in [100, 20000) with "
             "replacement, r = 0 masks the last token of the first copy)",
}
NO_END_SEP_NOTE = ("clean protocol without the final [SEP] (end_sep off, for a model trained without an end "
                   "marker): [CLS] X X, distinct ordinary tokens, mask never at a copy's edge")


def protocol_note(cfg: dict, causal: bool) -> str:
    """How the sequences of a run with config ``cfg`` (its record) were framed, in words."""
    if causal:
        return CAUSAL_NOTE
    if cfg["protocol"] == "clean" and not cfg.get("end_sep", True):
        return NO_END_SEP_NOTE
    return PROTOCOL_NOTES.get(cfg["protocol"], cfg["protocol"])


CAUSAL_NOTE = ("causal model: BOS X X (X X when the tokenizer has no BOS; no [MASK]); the query is a token of the "
               "second copy, read left to right; 'after' is the prefix-matching target (the token that followed the "
               "previous instance)")


TARGET_WORDS = {
    "prev": "previous instance of the masked token",
    "before": "token before the previous instance",
    "after": "token after the previous instance",
    "next": "next instance of the masked token (third copy)",
    "after_prev_of_left": "token after the first-copy instance of the left neighbour",
    "before_prev_of_right": "token before the first-copy instance of the right neighbour",
}


def target_words(target: str, causal: bool = False) -> str:
    if causal and target == "after":
        return "token after the previous instance (prefix matching)"
    if causal and target == "prev":
        return "previous instance of the token"
    return TARGET_WORDS.get(target, f"target '{target}'")


def query_words(causal: bool) -> str:
    return "the repeated token" if causal else "[MASK]"


def figure_name(variant: str, target: str) -> str:
    return f"induction_{variant}_{target}.png"


def describe(meta: dict) -> list[str]:
    """The protocol as applied, then the verdict of every target (one line each)."""
    from attnlab.induction.scores import verdict_line

    cfg = meta["config"]
    note = protocol_note(cfg, bool(meta.get("causal")))
    lines = [f"induction: {note}" + ("" if cfg["protocol"] == "paper" or meta.get("causal") else
                                     "; `reproduce` uses the paper protocol")]
    verdicts = meta.get("verdict") or {}
    if verdicts:
        rule = next(iter(verdicts.values()))["rule"]
        lines.append(f"verdict ({rule}; chance = uniform attention over the visible keys, null = the same positions "
                     "without the repeat):")
        lines += [f"  {verdict_line(t, v)}" for t, v in verdicts.items()]
        if any(v.get("avoided") for v in verdicts.values()):
            lines.append(f"  ({next(iter(verdicts.values()))['avoid_rule']})")
    return lines


def _identity(cfg: InductionConfig, ctx) -> dict:
    from attnlab.core.provenance import source_fingerprint
    from attnlab.induction.variants import get_variant

    variant = get_variant(cfg.variant)  # a bad name fails before any model is loaded
    return {"variant": source_fingerprint(variant.build)}


INDUCTION = Experiment(
    name="induction",
    config=InductionConfig,
    help="induction map of one model on one RRT variant, with chance, null and a verdict",
    description=("Mask one token of a repeated random sequence (causal models: read one repeated token) and score "
                 "the attention from it to the variant's targets, per layer and head; beside every score its "
                 "chance level, an empirical null (the same positions without the repeat), a bootstrap CI, and one "
                 "verdict per target.\n\n" + __doc__.split("\n\n", 1)[1]),
    identity=_identity,
    compute="attnlab.induction.maps:compute",
    save="attnlab.induction.maps:save",
    summary="attnlab.induction.maps:summary",
    plot="attnlab.figures.induction:plot",
    describe=describe,
    slot=("variant",),
)

EXPERIMENTS = [INDUCTION]
