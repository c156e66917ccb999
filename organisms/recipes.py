"""Recipes for model organisms: small transformers trained here, on this CPU, until they form induction heads.

A recipe fixes everything that determines the trained weights except the seed and the corpus: the architecture
and its size, the tokenizer's vocabulary size, the data mix, the objective and the optimiser's schedule. Its
name and content enter the run's reuse key.

Why these choices (``docs/organisms.md`` has the measurements):

- **Repeated spans of random tokens at varied lengths and offsets**, mixed with Simple Wikipedia text. A copy at
  a fixed distance lets a head find it by position alone: a 2-layer GPT-2 trained on ``X X`` halves learned that
  positional lookup within 400 steps and copied nothing at another distance. Varied spans (4-40 tokens), gaps
  and offsets leave content (the previous token's identity) as the only key.
- **Rotary positions** (GPT-NeoX; ModernBERT for the masked model): a previous-token head is one fixed relative
  offset, so it forms early and the induction head can build on it. A 2-layer BERT with learned absolute
  positions (lr 2e-3, 20% masked) showed no copying gain in 2,500 steps (10 min).
- **A learning rate of 3e-3** (constant after warm-up): at 1e-3 the causal model was still on its plateau at
  step 1,700; at 3e-3 the phase change came at step 1,300-1,400.
- **No end marker in the masked model's data**: sequences are 128 tokens of blocks after [CLS], measured with
  ``end_sep=False`` (the protocol framed as the model was trained). Ending every sequence in [SEP] at varied
  lengths, as BERT's inputs do (tried in two seeds, and with fragment copies, a third layer, copies masked apart,
  a curriculum and corrupted copies), formed no head in any run.
- **A local first layer in the masked model** (``local_first`` 2: layer 0 is a ModernBERT sliding-window layer
  that sees two tokens either side; layer 1 is global). With a global first layer the masked model either formed
  no head (three seeds of four) or fed its induction head from duplicate-token heads: every first-copy token finds
  its duplicate in the second copy except the masked one, whose duplicate is the [MASK] - a route with no
  previous-token head in it. A first layer that cannot reach a duplicate leaves matching the neighbours as the only
  route: in seeds 0 and 1 a layer-0 previous-token head formed and fed a layer-1 head at the [MASK] through both
  its queries and its keys (the masked token is hidden, so the query needs its neighbour too), with phase changes at
  steps 3,100 and 3,900. Neither text first (1,000 steps of text only: the previous- and next-token heads formed in
  layer 1, where no induction head can read them; no copying gain by step 2,200) nor spans that repeat their own
  tokens (``p_pooled`` 0.5: faster copying, gain 6.1 at step 2,400, but again duplicate-token heads in layer 0)
  did this.
- **Eight heads of 16 dimensions in the causal model**: with four heads of 32, seed 0 formed its induction head only
  at step 3,000 (three layer-0 heads each necessary to it) and seed 1 formed none in 3,000 steps; with eight, seed
  0's phase change came at step 1,800 (one previous-token head feeding one induction head) and seed 1's at steps
  2,100-2,300 (two induction heads sharing the work).
- **A quarter of the first copies in the causal loss** (``first_copy_loss``): a span's first copy is random tokens,
  so predicting them teaches only that they are uniform, while the 2,048-way output head at every position was
  about a third of a step's time (0.23 s a step against 0.28 s, one process). A quarter stays so that the model
  still learns they are uniform: the first copy's loss is the copying gain's control, and leaving them all out
  (0.205 s a step) let it rise above ln 2048, overstating what the copy buys by about 2 nats. With a quarter, seed
  0's phase change came at steps 900-1,100 instead of 1,700-1,800, so the recipe stops at step 2,400.
- **First-layer head dropout after the phase change** (``head_dropout`` 0.3; causal from step 1,200, masked from
  step 3,400):
  without it one previous-token head feeds the induction head alone, so zeroing that feeder removes the copying as
  surely as zeroing the induction head (104%); with each layer-0 head dropped in 30% of the sequences after the
  induction head has formed (seed 0 forms it at step 968, seed 2 at about 1,150), a second previous-token head
  takes up the role, and neither feeder removes more than a tenth. From the start of training the same dropout
  delayed the phase change past the budget (seeds 1 and 2 at p 0.3, seed 0 at p 0.25) or spread the induction
  role over three layer-1 heads (seed 0 at p 0.2 and 0.3), none removing half of the gain. In the masked model
  with its local first layer (seed 0: head formed at steps 3,000-3,200), zeroing the one previous-token feeder L0H3
  removed 78% of the copying gain without the dropout (step 4,000); with it no layer-0 head removes more than 0.9%
  (step 5,000), and all four layer-0 heads are previous-token heads.
- **A 2,048-entry WordPiece vocabulary** chosen on the corpus (every character, then the most frequent words):
  every token is seen often enough in a few thousand steps, and the softmax over the vocabulary stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from attnlab.core.config import option
from attnlab.core.errors import InputError


@dataclass(frozen=True)
class Recipe:
    """Everything but the seed and the corpus that decides the trained weights."""

    name: str
    objective: str  # "causal" (next token) or "mlm" (masked tokens)
    arch: str  # transformers model_type: "gpt_neox" or "bert"
    layers: int
    d_model: int
    heads: int
    vocab_size: int  # the WordPiece vocabulary trained on the corpus
    seq_len: int  # tokens per training sequence
    batch: int
    steps: int
    lr: float
    warmup: int
    span_min: int  # repeated random spans: lengths span_min..span_max
    span_max: int
    gap_max: int  # text between the two copies: 0..gap_max tokens
    p_text: float  # share of the blocks that are plain text instead of a repeated span
    mask_prob: float = 0.15  # mlm only
    sep_end: bool = False  # end every sequence in [SEP], as BERT's inputs (and attnlab's masked protocols) do
    min_len: int = 0  # > 0: one sequence length per batch, drawn from min_len..seq_len ([SEP] at varied positions)
    p_fragment: float = 0.0  # share of the second copies that are only a contiguous piece of X
    copy_mask: float = 0.0  # mlm: > 0 masks second copies apart (every other token, with this probability)
    p_pooled: float = 0.0  # share of the spans whose n tokens are drawn with replacement from n // 2 random tokens
    # (each token about twice in X): no token of X lacks a duplicate, so only matching the neighbours finds it
    local_first: int = 0  # modernbert: > 0 makes layer 0 a sliding-window layer that sees tokens up to this far
    text_until: int = 0  # steps before this one train on text blocks only (then the recipe's mix)
    first_copy_loss: float = 1.0  # causal: the share of spans' first-copy tokens (random) that the loss predicts
    head_dropout: float = 0.0  # training only: each first-layer head's output is dropped with this probability,
    # per sequence (DropHead; the kept ones scaled by 1 / (1 - p)), so no single first-layer head is necessary
    head_dropout_from: int = 0  # ... from this step on (before it, training is the recipe's without head dropout)
    checkpoints: int = 8  # log-spaced checkpoints, the last one at ``steps``
    linear_checkpoints: int = 0  # plus this many evenly spaced ones: a phase change late in training is located
    eval_every: int = 100
    summary: str = ""

    def __post_init__(self):
        if not 0 <= self.head_dropout < 1:
            raise InputError(f"recipe {self.name!r}: head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.local_first and self.arch != "modernbert":
            raise InputError(f"recipe {self.name!r}: local_first needs the modernbert architecture (its sliding-window "
                             f"layers), not {self.arch!r}")

    def record(self) -> dict:
        return asdict(self)

    @property
    def dropout_from(self) -> int | None:
        """The step first-layer head dropout starts at (None: the recipe has none); the figures mark it."""
        return self.head_dropout_from if self.head_dropout > 0 else None


RECIPES = {r.name: r for r in [
    Recipe("induction-causal", "causal", "gpt_neox", layers=2, d_model=128, heads=8, vocab_size=2048, seq_len=128,
           batch=32, steps=2400, lr=3e-3, warmup=100, span_min=4, span_max=40, gap_max=8, p_text=0.2,
           first_copy_loss=0.25, head_dropout=0.3, head_dropout_from=1200, linear_checkpoints=8,
           summary="2-layer GPT-NeoX (rotary), d_model 128, 8 heads; next-token loss on text and repeated random "
                   "spans (a quarter of the first copies' random tokens); from step 1,200, each layer-0 head "
                   "dropped in 30% of the sequences"),
    Recipe("induction-mlm", "mlm", "modernbert", layers=2, d_model=128, heads=4, vocab_size=2048, seq_len=128,
           batch=32, steps=5000, lr=4e-3, warmup=100, span_min=4, span_max=40, gap_max=8, p_text=0.2, mask_prob=0.3,
           local_first=2, head_dropout=0.3, head_dropout_from=3400, linear_checkpoints=25,
           summary="2-layer ModernBERT (a BERT-style encoder with rotary positions), d_model 128, 4 heads; layer 0 a "
                   "sliding-window layer that sees two tokens either side, layer 1 global; masked-LM loss (30% "
                   "masked) on text and repeated random spans, 128 tokens after [CLS] with no end marker (measure "
                   "it with end_sep off); from step 3,400, each layer-0 head dropped in 30% of the sequences"),
    Recipe("smoke", "causal", "gpt_neox", layers=2, d_model=32, heads=2, vocab_size=256, seq_len=48, batch=4,
           steps=40, lr=1e-3, warmup=5, span_min=3, span_max=10, gap_max=3, p_text=0.3, checkpoints=4, eval_every=10,
           summary="a seconds-long run for tests: checks the machinery, forms nothing"),
    Recipe("smoke-mlm", "mlm", "bert", layers=2, d_model=32, heads=2, vocab_size=256, seq_len=48, batch=4,
           steps=40, lr=1e-3, warmup=5, span_min=3, span_max=10, gap_max=3, p_text=0.3, checkpoints=4, eval_every=10,
           summary="a seconds-long masked-LM run for tests"),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def checkpoint_steps(recipe: Recipe) -> list[int]:
    """Steps at which a checkpoint is saved: log-spaced from ``eval_every`` (or less) to ``steps`` inclusive, and
    ``linear_checkpoints`` evenly spaced ones."""
    import numpy as np

    first = max(1, min(recipe.eval_every, recipe.steps))
    steps = set(np.round(np.geomspace(first, recipe.steps, recipe.checkpoints)).astype(int).tolist())
    steps |= {round(recipe.steps * (k + 1) / recipe.linear_checkpoints) for k in range(recipe.linear_checkpoints)}
    return sorted(int(s) for s in steps)


@dataclass
class DynamicsConfig:
    trials: int = option(32, "repeated-random-token trials per checkpoint", minimum=2)
    seq_len: int = option(30, "length n of the random block X", minimum=3)
    seed: int = option(0, "random seed (the same trials at every checkpoint)")
    icl_trials: int = option(32, "held-out sequences for the ICL score", minimum=1)
