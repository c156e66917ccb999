"""The probe experiment's steps: labels -> aligned units -> hidden states of one forward pass per batch -> a probe
per layer on the real labels and on the control task -> accuracy with a CI, selectivity, majority baseline.

Record: :data:`attnlab.probes.experiment.PROBE`; figure: :func:`attnlab.figures.probes.plot`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.errors import InputError
from attnlab.core.extractor import pad_sequences
from attnlab.core.outputs import write_csv
from attnlab.core.resources import check_fits
from attnlab.core.stats import bootstrap_ratio_ci
from attnlab.probes.experiment import ProbeConfig
from attnlab.probes.labels import align, builtin_sentences, conllu_sentences

HEADER = ["layer", "task", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "majority", "n_train",
          "n_dev"]


@dataclass
class ProbeResult:
    config: ProbeConfig
    task: str
    rows: list  # HEADER rows (floats)
    cost: dict
    dropped: dict
    classes: list[str]


def hidden_units(lm, aligned, layers: list[int], batch_size: int = 16) -> np.ndarray:
    """``[len(layers), N, D]``: every unit's pooled hidden state at each layer (0: the embeddings), from one forward
    pass per batch of sentences (the model's own hidden states; no second implementation)."""
    by_sentence: dict[int, list[int]] = {}
    for u, (k, _, _, _) in enumerate(aligned.units):
        by_sentence.setdefault(k, []).append(u)
    out = np.zeros((len(layers), len(aligned.units), lm.d_model), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(aligned.ids), batch_size):
            pad = (lm.tokenizer.pad_token_id if lm.tokenizer is not None else None) or 0
            ids, mask = pad_sequences(aligned.ids[s:s + batch_size], pad_id=pad)
            states = lm.base(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                             output_hidden_states=True).hidden_states
            chosen = torch.stack([states[layer].float() for layer in layers]).cpu()  # [l, b, S, D]
            for b in range(ids.shape[0]):
                for u in by_sentence.get(s + b, []):
                    positions = aligned.units[u][1]
                    out[:, u] = chosen[:, b, positions].mean(1).numpy()
    return out


def control_labels(types: list[str], labels: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Hewitt and Liang's control task: each word type gets one random label, drawn from the real labels'
    distribution; every occurrence of the type carries it."""
    rng = np.random.default_rng(seed + 7)
    share = np.bincount(labels, minlength=n_classes) / len(labels)
    assigned = {}
    for t in types:
        if t not in assigned:
            assigned[t] = int(rng.choice(n_classes, p=share))
    return np.array([assigned[t] for t in types])


def fit_predict(cfg: ProbeConfig, x_train, y_train, x_dev, n_classes: int) -> np.ndarray:
    """The probe's predictions on ``x_dev`` after training on ``x_train``/``y_train`` (features standardised with the
    training statistics)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_dev = (x_train - mean) / std, (x_dev - mean) / std
    if len(np.unique(y_train)) < 2:
        return np.full(len(x_dev), y_train[0])
    if cfg.probe == "linear":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=cfg.c, max_iter=300, random_state=cfg.seed)
            clf.fit(x_train, y_train)
        return clf.predict(x_dev)
    torch.manual_seed(cfg.seed)
    d = x_train.shape[1]
    if cfg.probe == "rank":
        model = torch.nn.Sequential(torch.nn.Linear(d, cfg.rank, bias=False), torch.nn.Linear(cfg.rank, n_classes))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(d, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden,
                                                                                                      n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1.0 / (cfg.c * len(x_train)))
    xt, yt = torch.as_tensor(x_train), torch.as_tensor(y_train)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model(torch.as_tensor(x_dev)).argmax(-1).numpy()


def split_by_sentence(n_sentences: int, dev_share: float, seed: int) -> np.ndarray:
    """``[n_sentences]`` bool: the dev sentences (a seeded share of them, at least one each side)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_sentences)
    n_dev = min(n_sentences - 1, max(1, round(dev_share * n_sentences)))
    dev = np.zeros(n_sentences, dtype=bool)
    dev[order[:n_dev]] = True
    return dev


def probe_layers(cfg: ProbeConfig, x: np.ndarray, y: np.ndarray, types: list[str], sentence_of: np.ndarray,
                 layers: list[int], n_classes: int, task: str) -> list:
    """Probe every layer's units ``x [layers, N, D]`` for labels ``y [N]``, and for the control task on the same
    split: HEADER rows. The split is by sentence (``sentence_of [N]``), so no dev sentence is seen in training."""
    y_control = control_labels(types, y, n_classes, cfg.seed)
    dev_sentence = split_by_sentence(int(sentence_of.max()) + 1, cfg.dev_share, cfg.seed)
    dev = dev_sentence[sentence_of]
    train = ~dev
    if dev.sum() == 0 or train.sum() == 0:
        raise InputError("too few sentences to split into training and evaluation; give more text")
    majority = float((y[dev] == np.bincount(y[train], minlength=n_classes).argmax()).mean())
    dev_sentences = np.unique(sentence_of[dev])
    rows = []
    for li, layer in enumerate(layers):
        correct = fit_predict(cfg, x[li][train], y[train], x[li][dev], n_classes) == y[dev]
        control = fit_predict(cfg, x[li][train], y_control[train], x[li][dev], n_classes) == y_control[dev]
        num = [correct[sentence_of[dev] == s].sum() for s in dev_sentences]
        den = [(sentence_of[dev] == s).sum() for s in dev_sentences]
        lo, hi = bootstrap_ratio_ci(num, den, cfg.seed)
        acc, ctrl = float(correct.mean()), float(control.mean())
        rows.append([layer, task, acc, lo, hi, ctrl, acc - ctrl, majority, int(train.sum()), int(dev.sum())])
    return rows


def parse_layers(spec: str, n: int) -> list[int]:
    from attnlab.geometry.projections import parse_range

    return parse_range(spec, n, "layers")


def compute(cfg: ProbeConfig, lm, ctx) -> ProbeResult:
    t0 = time.perf_counter()
    if lm.tokenizer is None or not getattr(lm.tokenizer, "is_fast", False):
        raise InputError(f"model '{lm.name}' needs a fast tokenizer (tokenizer.json) to align words to tokens; save "
                         "it beside the model (save_pretrained)")
    kind, _, rest = cfg.labels.partition(":")
    if kind == "conllu":
        sentences, task = ctx.extra.get("sentences") or conllu_sentences(rest, cfg.task), cfg.task
    else:
        sentences, task = builtin_sentences(ctx.docs, rest, cfg.sentences, lm.tokenizer), rest
    aligned = align(sentences, lm.tokenizer, lm.max_positions, cfg.max_tokens, cfg.pool, subword_task=task == "initial")
    layers = parse_layers(cfg.layers, lm.n_layers + 1)
    per_unit = len(layers) * lm.d_model * 4
    check_fits(len(aligned.units) * per_unit * 3, f"hidden states of {len(aligned.units)} words at {len(layers)} layers",
               per_unit * 3, "words (max_tokens)")
    x = hidden_units(lm, aligned, layers)
    t_hidden = time.perf_counter()
    classes = sorted({u[2] for u in aligned.units})
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[u[2]] for u in aligned.units])
    rows = probe_layers(cfg, x, y, [u[3] for u in aligned.units], np.array([u[0] for u in aligned.units]), layers,
                        len(classes), task)
    cost = {"units": len(aligned.units), "tokens": aligned.tokens, "sentences": len(aligned.ids),
            "hidden_s": round(t_hidden - t0, 2), "seconds": round(time.perf_counter() - t0, 2)}
    dropped = {"longer_than_the_model": aligned.dropped_long, "beyond_max_tokens": aligned.dropped_budget}
    return ProbeResult(cfg, task, rows, cost, dropped, classes)


def save(folder, result: ProbeResult, ctx=None) -> list[str]:
    write_csv(folder / "probe.csv", HEADER, ([*r[:2], *(f"{v:.6g}" for v in r[2:8]), r[8], r[9]] for r in result.rows))
    return ["probe.csv"]


def summary(result: ProbeResult, ctx=None) -> dict:
    cfg = result.config
    return {"task": result.task, "classes": result.classes, "cost": result.cost, "dropped": result.dropped,
            "alignment": ("each word's first sub-word token" if cfg.pool == "first" else "the mean of each word's "
                          "sub-word tokens") + ("; builtin 'initial' labels every sub-word token" if result.task ==
                                                "initial" else ""),
            "split": f"by sentence, {cfg.dev_share:.0%} of sentences held out (seed {cfg.seed})",
            "control": "each word type a random label drawn from the real labels' distribution (Hewitt and Liang 2019)",
            "layers": [dict(zip(HEADER, r)) for r in result.rows]}
