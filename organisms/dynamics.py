"""How an organism's induction head forms (``attnlab dynamics``): attnlab's own measurements at every checkpoint.

Per checkpoint (``[CLS] X X`` trials of the clean protocol, the same seed at every checkpoint):

- ``induction_score``: the strongest head's lift over the null on the target the mechanism predicts - "after"
  (prefix matching: the token after the previous instance) for causal models, "prev" (the previous instance of
  the masked token) for masked LMs - with the head (:func:`attnlab.induction.maps.compute`);
- ``previous_token``: the strongest head's previous-token score minus chance (``attnlab heads``' detector);
- ``copying_gain``: loss on the first copy minus loss on the second (``attnlab ablate``'s rrt task, no ablation);
- ``rrt_loss``: the loss on the second copy (the same task);
- ``icl_score``: Olsson et al.'s in-context learning score, the loss of tokens early in a sequence (positions
  8-23) minus late (96-127), on held-out sequences of the training distribution (the paper's 50 vs 500 tokens,
  scaled to the organisms' 128-token sequences).

**Formation rule**: the induction head forms at the first checkpoint whose induction score reaches half of the
largest score of any checkpoint, provided that largest score is at least 0.1 (else: no formation).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from attnlab.organisms.recipes import DynamicsConfig

FORMATION_RULE = ("the first checkpoint whose strongest induction lift reaches half of the largest over all "
                  "checkpoints, if that largest is >= 0.1")
COLUMNS = ["step", "checkpoint", "induction_head", "induction_score", "previous_token_head", "previous_token",
           "copying_gain", "rrt_loss", "icl_score"]
EARLY, LATE = (8, 24), (96, 128)  # token positions compared by the ICL score (of 128-token sequences)


def _best(values: np.ndarray) -> tuple[str, float]:
    flat = np.nan_to_num(values, nan=-np.inf)
    layer, head = np.unravel_index(int(np.argmax(flat)), flat.shape)
    return f"L{layer}H{head}", float(values[layer, head])


def previous_token_score(lm, n: int, seed: int, trials: int = 4, end_sep: bool = True) -> tuple[str, float]:
    """The strongest head's previous-token score minus chance on a few [CLS] X X sequences (every query row)."""
    from attnlab.circuits.heads import pattern_scores

    scores = pattern_scores(lm, trials, n, seed, ["previous_token"], end_sep)
    return _best(scores["previous_token"][2].numpy())


def icl_score(lm, recipe, text: torch.Tensor, trials: int, seed: int) -> float:
    """Olsson et al.'s ICL score on held-out sequences of the training distribution (blocks of held-out text and
    repeated random spans): the mean loss of tokens at positions EARLY minus at LATE. Causal: next-token loss;
    masked: the loss of the masked tokens (15%, BERT's 80/10/10) at those positions."""
    from dataclasses import replace

    from attnlab.organisms.data import batch, generator, mask_for_mlm

    vocab = lm.vocab_size
    ids, _ = batch(replace(recipe, batch=trials), text, vocab, seed + 7777, 0, length=recipe.seq_len)
    early, late = slice(*EARLY), slice(*LATE)
    with torch.inference_mode():
        if lm.is_causal:
            logits = lm.model(input_ids=ids.to(lm.device)).logits.float().cpu()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            return float(nll[:, early.start - 1:early.stop - 1].mean() - nll[:, late.start - 1:late.stop - 1].mean())
        inputs, labels = mask_for_mlm(ids, 0.15, vocab, generator(seed + 7777, 0, stream=1))
        logits = lm.model(input_ids=inputs.to(lm.device)).logits.float().cpu()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        chosen = labels >= 0
        pick = lambda sl: nll[:, sl][chosen[:, sl]].mean()  # noqa: E731
        return float(pick(early) - pick(late))


def end_sep(recipe) -> bool:
    """Whether the rrt sequences a checkpoint of ``recipe`` is measured on end in [SEP]: a masked model is framed as
    it was trained (a recipe without ``sep_end`` never showed it one); decoders have none either way."""
    return recipe.objective == "causal" or recipe.sep_end


def checkpoint_row(path, step: int, cfg: DynamicsConfig, text: torch.Tensor, recipe) -> dict:
    """Every measurement of one checkpoint (a folder loadable by :func:`attnlab.load_model`)."""
    from attnlab.circuits.tasks import rrt_metrics, rrt_task
    from attnlab.core.models import load_model
    from attnlab.induction.experiment import InductionConfig
    from attnlab.induction.maps import compute

    lm = load_model(str(path), masked_lm=True, device="cpu")
    target = "after" if lm.is_causal else "prev"
    sep = end_sep(recipe)
    result = compute(InductionConfig(model=str(path), seq_len=cfg.seq_len, trials=cfg.trials, seed=cfg.seed,
                                     end_sep=sep), lm, keep_rows=0)
    head, lift = _best(result.stats[target].lift)
    prev_head, prev = previous_token_score(lm, cfg.seq_len, cfg.seed, end_sep=sep)
    metrics = rrt_metrics(lm, rrt_task(lm, cfg.trials, cfg.seq_len, cfg.seed, sep))
    return {"step": step, "checkpoint": str(path.name), "induction_head": head, "induction_score": lift,
            "previous_token_head": prev_head, "previous_token": prev,
            "copying_gain": float(metrics["copying_gain"].mean()), "rrt_loss": float(metrics["ce_second"].mean()),
            "icl_score": icl_score(lm, recipe, text, cfg.icl_trials, cfg.seed), "target": target}


def formed_at(rows: list[dict]) -> int | None:
    """The step :data:`FORMATION_RULE` names, or None."""
    scores = [r["induction_score"] for r in rows]
    top = max(scores, default=float("nan"))
    if not np.isfinite(top) or top < 0.1:
        return None
    return next(r["step"] for r in rows if r["induction_score"] >= top / 2)


def measure(folder, out, cfg: DynamicsConfig, progress: bool = False, say=print) -> dict:
    """Every checkpoint of a train folder, measured; dynamics.csv, dynamics.png and meta.json written to ``out``."""
    from pathlib import Path

    from attnlab.core.corpus import load_corpus
    from attnlab.core.errors import AttnlabError, InputError
    from attnlab.core.outputs import check_out_dir, csv_cell, folder_lock, read_json, write_csv, write_json
    from attnlab.figures.organisms import plot_dynamics
    from attnlab.organisms.data import token_stream

    folder, out = Path(folder), Path(out)
    train_meta = read_json(folder / "meta.json")
    if not train_meta or train_meta.get("experiment") != "train" or not (folder / "checkpoints").is_dir():
        raise InputError(f"{folder} is not a finished `attnlab train` folder (no meta.json or checkpoints/); pass the "
                         "--out folder of a finished training run")
    found = sorted(p for p in (folder / "checkpoints").iterdir()
                   if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit())
    if not found:
        raise InputError(f"{folder}/checkpoints holds no checkpoint folders (step-NNNNNN)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(found[-1]))
    try:
        docs = load_corpus(train_meta["corpus"])
    except AttnlabError as exc:
        raise InputError(f"the corpus {folder} was trained on cannot be read here ({exc}); its held-out text is "
                         "measured, so the same corpus is needed (meta.json's corpus)") from None
    stream = token_stream(tokenizer, [d.text for d in docs])
    held_out = stream[int(0.9 * len(stream)):]  # the text the organism never trained on
    from attnlab.organisms.recipes import Recipe

    recipe = Recipe(**train_meta["recipe"])
    check_out_dir(out)
    with folder_lock(out):
        rows = []
        for path in found:
            rows.append(checkpoint_row(path, int(path.name[5:]), cfg, held_out, recipe))
            if progress:
                r = rows[-1]
                say(f"dynamics: step {r['step']}: {r['induction_head']} {r['induction_score']:.3f}, copying gain "
                    f"{r['copying_gain']:.3f}")
        step = formed_at(rows)
        write_csv(out / "dynamics.csv", COLUMNS, [[csv_cell(r[c]) for c in COLUMNS] for r in rows])
        label = train_meta["recipe"]["name"]
        plot_dynamics(rows, step, FORMATION_RULE, f"{label} (seed {train_meta['seed']}): a small model trained here",
                      out / "dynamics.png", recipe.dropout_from)
        meta = {"experiment": "dynamics", "checkpoints": str(folder), "config": asdict(cfg), "rows": rows,
                "end_sep": end_sep(recipe), "formed_at": step, "rule": FORMATION_RULE, "target": rows[-1]["target"],
                "train_identity": train_meta.get("identity"), "code": code_identity()}
        write_json(out / "meta.json", meta)
    return meta


def code_identity() -> str:
    """The code that measures a checkpoint (this module and what it imports): a saved table is reused only under it."""
    from attnlab.core.provenance import code_fingerprint

    return code_fingerprint(__name__)
