"""Figures of the model organisms: training curves, and the formation of an induction head (in the style of
Olsson et al. 2022, Figure: in-context learning and induction heads against training steps)."""

from __future__ import annotations

import numpy as np

from attnlab.figures.style import plt, save


def _dropout_mark(ax, dropout_from: int | None) -> None:
    """A grey dash-dot line where first-layer head dropout starts (the recipe's ``head_dropout_from``)."""
    if dropout_from is not None:
        ax.axvline(max(dropout_from, 1), color="#777777", lw=1.0, ls="-.")


def _dropout_note(dropout_from: int | None) -> str:
    return "" if dropout_from is None else f"; grey dash-dot: head dropout in layer 0 from step {dropout_from:,}"


def plot_curves(rows: list, header: list, title: str, path, dropout_from: int | None = None) -> None:
    """Loss on text, loss on the second copy of repeated tokens (and on the first), and the copying gain,
    against training steps; where first-layer head dropout starts marked (``dropout_from``; None: none)."""
    col = {name: i for i, name in enumerate(header)}
    data = np.array([[np.nan if v is None else float(v) for v in r] for r in rows], dtype=float)
    steps = np.maximum(data[:, col["step"]], 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(steps, data[:, col["text_loss"]], label="held-out text", color="#555555")
    a.plot(steps, data[:, col["rrt_loss_first"]], label="repeated tokens: first copy", color="#9ecae1")
    a.plot(steps, data[:, col["rrt_loss_second"]], label="repeated tokens: second copy", color="#08519c")
    a.set_xscale("log")
    a.set_xlabel("training step (log scale; step 0 drawn at 1)", fontsize=10)
    a.set_ylabel("loss (nats)", fontsize=10)
    a.legend(fontsize=9)
    a.set_title("losses", fontsize=11)
    b.plot(steps, data[:, col["copying_gain"]], color="#d95f02", label="copying gain (first - second copy)")
    b.plot(steps, data[:, col["rrt_acc_second"]], color="#1b9e77", label="top-1 accuracy, second copy")
    b.set_xscale("log")
    b.axhline(0, color="grey", lw=0.8, ls="--")
    b.set_xlabel("training step (log scale; step 0 drawn at 1)", fontsize=10)
    b.legend(fontsize=9)
    b.set_title("in-context copying", fontsize=11)
    for ax in (a, b):
        _dropout_mark(ax, dropout_from)
    fig.suptitle(title + _dropout_note(dropout_from), fontsize=11)
    fig.tight_layout()
    save(fig, path)


def plot_dynamics(rows: list[dict], formed_at: int | None, rule: str, title: str, path,
                  dropout_from: int | None = None) -> None:
    """Per checkpoint: the strongest induction head's score and the previous-token score (top), the copying gain and
    the ICL score (middle), the loss on repeated tokens (bottom), against training steps on a log scale; the step
    where the induction head forms (``formed_at``, by ``rule``) marked on every panel, and where first-layer head
    dropout starts (``dropout_from``; None: none)."""
    steps = np.maximum(np.array([r["step"] for r in rows], dtype=float), 1)

    def series(name):
        return np.array([np.nan if r.get(name) is None else r[name] for r in rows], dtype=float)

    fig, axes = plt.subplots(3, 1, figsize=(7.5, 8.4), sharex=True)
    axes[0].plot(steps, series("induction_score"), "o-", color="#08519c", label="strongest induction head (lift)")
    axes[0].plot(steps, series("previous_token"), "s-", color="#6a51a3", label="strongest previous-token head")
    axes[0].set_ylabel("score", fontsize=10)
    axes[1].plot(steps, series("copying_gain"), "o-", color="#d95f02", label="copying gain (nats)")
    axes[1].plot(steps, series("icl_score"), "s-", color="#1b9e77", label="ICL score: loss at tokens 8-23 minus 96-127 (nats)")
    axes[1].axhline(0, color="grey", lw=0.8, ls="--")
    axes[1].set_ylabel("nats", fontsize=10)
    axes[2].plot(steps, series("rrt_loss"), "o-", color="#555555", label="loss on repeated tokens (second copy)")
    axes[2].set_ylabel("loss (nats)", fontsize=10)
    axes[2].set_xlabel("training step (log scale; step 0 drawn at 1)", fontsize=10)
    for ax in axes:
        ax.set_xscale("log")
        if formed_at is not None:
            ax.axvline(max(formed_at, 1), color="#d62728", lw=1.2, ls=":")
        _dropout_mark(ax, dropout_from)
        ax.legend(fontsize=9, loc="best")
        ax.grid(alpha=0.3)
    mark = f"dotted red: the induction head forms at step {formed_at}" if formed_at is not None else \
        "no checkpoint meets the formation rule"
    fig.suptitle(f"{title}\n{mark}{_dropout_note(dropout_from)}\nrule: {rule}", fontsize=10)
    fig.tight_layout()
    save(fig, path)
