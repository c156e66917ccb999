"""Records and configs of the experiments on a researcher's own text (torch-free, read by the command line):
``attnlab attention`` (every head's attention on a text, and a head finder) and ``attnlab lens`` (the logit lens
and a tuned lens).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.core.config import check_fields, option
from attnlab.core.corpus import DEFAULT_CORPUS
from attnlab.core.errors import InputError
from attnlab.core.runs import Experiment
from attnlab.icl.experiment import CORPUS_HELP, corpus_identity, prepare_corpus
from attnlab.induction.experiment import dtype_option, model_option, revision_option


def read_text(text: str | None, text_file: str | None) -> str:
    """The text given inline or in a file (exactly one of them); a one-line error otherwise."""
    from pathlib import Path

    if (text is None) == (text_file is None):
        raise InputError("give the text either inline (text) or as a file (text_file), exactly one of them")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise InputError(f"text file {text_file} does not exist; pass a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"text file {text_file} is not UTF-8 text") from None
    if not text.strip():
        raise InputError("the text is empty; give a sentence or more")
    return text


@dataclass
class AttentionConfig:
    model: str = model_option("bert-base-uncased")
    text: str | None = option(None, "the text, inline")
    text_file: str | None = option(None, "a UTF-8 file with the text")
    source: str | None = option(None, "head finder: the token attention comes FROM (a token string, or its index)",
                                flag="--from", metavar="TOKEN")
    target: str | None = option(None, "head finder: the token attention goes TO (a token string, or its index)",
                                flag="--to", metavar="TOKEN")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        check_fields(self)
        self.text = read_text(self.text, self.text_file)
        self.text_file = None  # the text itself is the config (a file's content, not its name, determines the result)
        if (self.source is None) != (self.target is None):
            raise InputError("the head finder needs both from and to (e.g. --from it --to cat)")


@dataclass
class LensConfig:
    model: str = model_option("bert-base-uncased", "a model with its LM head: Hub id or local folder")
    text: str | None = option(None, "the text, inline (or text_file, or rrt)")
    text_file: str | None = option(None, "a UTF-8 file with the text")
    rrt: bool = option(False, "read repeated random tokens instead of a text: where does the copy happen?")
    trials: int = option(16, "rrt: random sequences", minimum=1)
    seq_len: int = option(30, "rrt: length n of the random block", minimum=3)
    top_k: int = option(5, "tokens listed per layer and position", minimum=1)
    tuned: bool = option(False, "also train a tuned lens (one affine translator per layer) on the corpus")
    corpus: str = option(DEFAULT_CORPUS, "the tuned lens's training text: " + CORPUS_HELP)
    train_tokens: int = option(8192, "tuned lens: corpus tokens to train on (a tenth more held out)", minimum=256)
    steps: int = option(200, "tuned lens: optimisation steps", minimum=1)
    lr: float = option(1e-3, "tuned lens: Adam's learning rate")
    seed: int = option(0, "random seed (rrt trials, tuned-lens batches)")
    revision: str | None = revision_option()
    dtype: str = dtype_option()

    def __post_init__(self):
        check_fields(self)
        if self.rrt:
            if self.text is not None or self.text_file is not None:
                raise InputError("give either rrt or a text, not both")
        else:
            self.text = read_text(self.text, self.text_file)
        self.text_file = None


def describe_attention(meta: dict) -> list[str]:
    lines = [f"attention: {meta['n_tokens']} tokens, {meta['layers']} layers x {meta['heads']} heads"]
    f = meta.get("finder")
    if f:
        best = f["heads"][:3]
        lines.append(f"head finder {f['from']!r} (position {f['from_index']}) -> {f['to']!r} (position "
                     f"{f['to_index']}): " + ", ".join(f"{h['head']} {h['value']:.3f} (rank {h['rank']})" for h in best)
                     + f"; uniform attention would give {f['chance']:.3g}" + (f"; {f['note']}" if f.get("note") else ""))
    return lines


def describe_lens(meta: dict) -> list[str]:
    kl = meta["kl_by_layer"]
    lines = [f"lens: KL(final || logit lens) by layer {', '.join(f'{v:.2f}' for v in kl['logit'])} nats"]
    if kl.get("tuned"):
        lines.append(f"tuned lens: {', '.join(f'{v:.2f}' for v in kl['tuned'])} nats (held-out corpus KL "
                     f"{meta['tuned_lens']['heldout_kl_before']:.3f} -> {meta['tuned_lens']['heldout_kl_after']:.3f})")
    if meta.get("rrt"):
        r = meta["rrt"]
        if r["never"] == r["trials"]:
            lines.append(f"rrt: the token the repeat predicts never becomes top-1 at any layer ({r['trials']} trials)")
        else:
            lines.append(f"rrt: the token the repeat predicts becomes top-1 first at layer {r['mean_first_layer']:.2f} "
                         f"on average ({r['never']} of {r['trials']} trials never)")
    return lines


ATTENTION = Experiment(
    name="attention", config=AttentionConfig,
    help="every head's attention on your own text, and a head finder (--from it --to cat)",
    description=("Every layer and head's full attention on a text of yours: a grid of the heads' maps per layer with "
                 "the tokens as ticks (attention_L<l>.png), an offline interactive page with the tokens as text "
                 "(attention.html: hover or click a token to colour the others by the attention it gives or "
                 "receives), the full attention (attention.npz: attention [layers, heads, q, k], tokens, token_ids). "
                 "With --from and --to, every head ranked by the attention from one token to the other "
                 "(finder.csv: the value, its rank among that query's keys, and uniform attention's value)."),
    compute="attnlab.text.attention:compute", save="attnlab.text.attention:save",
    summary="attnlab.text.attention:summary", plot="attnlab.figures.text:plot_attention",
    describe=describe_attention,
)

LENS = Experiment(
    name="lens", config=LensConfig,
    help="the logit lens (and a tuned lens) on your text or on repeated random tokens",
    description=("Each layer's residual stream through the model's own final norm and unembedding (the logit lens), "
                 "and with --tuned through one affine translator per layer trained on corpus text (the tuned lens, "
                 "identity-initialised, trained on KL to the final distribution). Per layer and position: the top "
                 "tokens, the probability and rank of the actual next token (causal models) or the token at a "
                 "masked position (masked LMs: each position masked in turn), and the KL to the model's final "
                 "distribution. --rrt reads repeated random tokens instead: the first layer where the repeated token "
                 "becomes top-1.\n\nOutputs: lens.csv, lens.png (layers x positions, coloured by top-1 probability, "
                 "the top-1 token in each cell), kl.png, rrt.csv (with --rrt), tuned_lens.safetensors (with --tuned), "
                 "meta.json."),
    identity=lambda cfg, ctx: corpus_identity(cfg, ctx) if cfg.tuned else {"corpus": "-"},
    prepare=lambda cfg, ctx: prepare_corpus(cfg, ctx) if cfg.tuned else None,
    compute="attnlab.text.lens:compute", save="attnlab.text.lens:save", summary="attnlab.text.lens:summary",
    plot="attnlab.figures.text:plot_lens", describe=describe_lens, lm_head="required",
)

EXPERIMENTS = [ATTENTION, LENS]
