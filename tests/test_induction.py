"""Induction maps: planted ground truth, target identity, reproducibility, equivalence on real weights."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import eager_attention, eager_copy
from planted import planted_lag_bert

from attnlab.core.errors import InputError
from attnlab.core.models import wrap_model
from attnlab.experiments.induction import InductionConfig, run_induction
from attnlab.induction import TokenSpec, get_variant, induction_scores, make_protocol, register_variant
from attnlab.induction.variants import RRTBatch, _REGISTRY, build_batch

SPEC = TokenSpec.bert_uncased_layout(30522)


def test_planted_head_scores_prev():
    n = 40
    lm = wrap_model(planted_lag_bert(lag=n))
    batch = build_batch(get_variant("standard"), make_protocol("clean", SPEC), 30, n, seed=0)
    scores = induction_scores(lm, batch)
    prev = scores.mean["prev"]
    assert prev[0, 0] >= 0.9, prev
    others = prev.clone()
    others[0, 0] = 0
    assert others.max() < 0.1
    assert scores.mean["before"][0, 0] < 0.1 and scores.mean["after"][0, 0] < 0.1


@pytest.mark.parametrize("protocol", ["clean", "paper"])
@pytest.mark.parametrize("seed", range(5))
def test_targets_by_token_identity(protocol, seed):
    proto = make_protocol(protocol, SPEC)
    for name in ("standard", "shuffled", "triple"):
        v = get_variant(name)
        b = build_batch(v, proto, 64, v.n_for(protocol, 30 if protocol == "clean" else None), seed)
        ids, m, tok = b.input_ids, b.mask_index, b.masked_token
        rows = torch.arange(len(m))
        assert (ids[rows, m] == proto.mask_id).all()
        if name == "standard":
            ok = ids[rows, b.targets["prev"]] == tok
            if protocol == "paper":  # quirk: r = 0 masks the first copy's last token; prev is [SEP] at 0
                quirk = m == (ids.shape[1] - 1) // 2
                assert (b.targets["prev"][quirk] == 0).all()
                ok |= quirk
            assert ok.all()
            assert (b.targets["before"] == (b.targets["prev"] - 1) % ids.shape[1]).all()
            assert (b.targets["after"] == b.targets["prev"] + 1).all()
        if name == "shuffled":
            assert (ids[rows, b.targets["after_prev_of_left"] - 1] == ids[rows, m - 1]).all()
            assert (ids[rows, (b.targets["before_prev_of_right"] + 1) % ids.shape[1]] == ids[rows, m + 1]).all()
        if name == "triple":
            ok = (ids[rows, b.targets["prev"]] == tok) & (ids[rows, b.targets["next"]] == tok)
            if protocol == "paper":
                ok |= b.targets["prev"] == 0
            assert ok.all()
        if protocol == "clean":  # never at a copy's edge; tokens are ordinary and distinct
            n = v.n_for("clean", 30)
            j = (m - 1) % n
            assert ((j >= 1) & (j <= n - 2)).all()
            assert ids[0, 0] == 101 and ids[0, -1] == 102
        else:
            assert (ids[:, 0] == 102).all()


def test_paper_protocol_layout():
    b = build_batch(get_variant("standard"), make_protocol("paper", SPEC), 200, 200, seed=3)
    assert b.input_ids.shape == (200, 401) and (b.input_ids[:, 0] == 102).all()
    assert ((b.mask_index >= 200) & (b.mask_index <= 399)).all()
    body = b.input_ids[:, 1:].clone()
    body[torch.arange(200), b.mask_index - 1] = b.masked_token
    assert ((body >= 100) & (body < 20000)).all()
    assert get_variant("triple").n_for("paper", None) == 150


def test_seeded_runs_identical(tmp_path):
    lm = wrap_model(planted_lag_bert(lag=20, heads=2))
    cfg = InductionConfig(model="planted", trials=8, seq_len=20, seed=7)
    run_induction(cfg, tmp_path / "a", lm=lm)
    run_induction(cfg, tmp_path / "b", lm=lm)
    a, b = np.load(tmp_path / "a" / "trials.npz"), np.load(tmp_path / "b" / "trials.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key
    assert (tmp_path / "a" / "scores.csv").read_bytes() == (tmp_path / "b" / "scores.csv").read_bytes()


def test_outputs_and_reuse(tmp_path):
    lm = wrap_model(planted_lag_bert(lag=25))
    cfg = InductionConfig(model="planted", variant="standard", trials=6, seq_len=25, seed=1)
    meta = run_induction(cfg, tmp_path, lm=lm)
    df = pd.read_csv(tmp_path / "scores.csv")
    assert list(df.columns) == ["model", "variant", "protocol", "target", "layer", "head", "mean", "sem", "n_trials",
                                "share_r0"]
    assert len(df) == 3 * 2 * 2 and set(df.target) == {"prev", "before", "after"}
    z = np.load(tmp_path / "trials.npz")
    assert z["input_ids"].shape == (6, 52) and z["attention_prev"].shape == (6, 2, 2)
    assert {"target_index_prev", "target_index_before", "target_index_after", "mask_index"} <= set(z.files)
    for t in ("prev", "before", "after"):
        assert (tmp_path / f"induction_standard_{t}.png").stat().st_size > 5000
    row = df[(df["target"] == "prev") & (df["layer"] == 0) & (df["head"] == 0)].iloc[0]
    assert row["mean"] == pytest.approx(z["attention_prev"][:, 0, 0].mean(), abs=1e-6)
    assert row["sem"] == pytest.approx(z["attention_prev"][:, 0, 0].std(ddof=1) / np.sqrt(6), abs=1e-6)
    assert json.loads((tmp_path / "meta.json").read_text())["config"]["seed"] == 1
    # the interactive view's rows are the scored rows: read at a target they give that target's scores
    rows = z["view_rows"].astype(np.float32)  # [3, L, H, S]
    for t in range(rows.shape[0]):
        for target in ("prev", "before", "after"):
            np.testing.assert_allclose(rows[t, :, :, z[f"target_index_{target}"][t]], z[f"attention_{target}"][t],
                                       atol=2e-3)  # float16 storage
    assert z["view_tokens"].shape == (3, 52) and z["view_masked"].shape == (3,)
    again = run_induction(cfg, tmp_path, lm=lm)  # the same model (by content): finished work is reused
    assert again["reused"] and again["reuse_key"] == meta["reuse_key"]


def test_scores_equal_eager_reference_on_minilm(minilm):
    """Extractor-based scores == the paper's method (eager, one sequence at a time) on real weights."""
    spec = TokenSpec.from_tokenizer(minilm.tokenizer, minilm.vocab_size)
    batch = build_batch(get_variant("shuffled"), make_protocol("clean", spec), 4, 60, seed=0)
    scores = induction_scores(minilm, batch, batch_size=3)
    ref = eager_copy(minilm.model)
    for t in range(4):
        full = eager_attention(ref, batch.input_ids[t].tolist())  # [L, H, S, S]
        row = full[:, :, batch.mask_index[t]]
        for name, pos in batch.targets.items():
            torch.testing.assert_close(scores.per_trial[name][t], row[:, :, pos[t]], atol=1e-5, rtol=0)


def test_user_variant_without_touching_core():
    @register_variant("gap_test", ["prev"], "X, k fillers, X")
    def build_gap(protocol, n_trials, n, g, k=5):
        x = protocol.draw(n_trials, n + k, g)
        body = torch.cat([x[:, :n], x[:, n:], x[:, :n]], dim=1)
        ids, off = protocol.frame(body)
        j = torch.randint(1, n - 1, (n_trials,), generator=g)
        return RRTBatch.masked(ids, off + n + k + j, protocol.mask_id, {"prev": off + j})

    try:
        b = build_batch(get_variant("gap_test"), make_protocol("clean", SPEC), 10, 20, seed=0)
        assert (b.input_ids[torch.arange(10), b.targets["prev"]] == b.masked_token).all()
    finally:
        _REGISTRY.pop("gap_test")


def test_bad_input():
    with pytest.raises(InputError, match="known variants: .*standard"):
        get_variant("nope")
    small = TokenSpec(1, 2, 3, torch.arange(5, 100), 100)
    with pytest.raises(InputError, match="paper.*only 100 entries"):
        make_protocol("paper", small)
    with pytest.raises(InputError, match="at least 1"):
        build_batch(get_variant("standard"), make_protocol("clean", SPEC), 0, 10, 0)
    with pytest.raises(InputError, match="lower seq_len to at most 255"):
        build_batch(get_variant("standard"), make_protocol("clean", SPEC), 2, 300, 0, max_positions=512)


def test_cli_plugin_variant_end_to_end(tmp_path, monkeypatch):
    from pathlib import Path

    from attnlab.experiments import cli

    lm = wrap_model(planted_lag_bert(lag=30))
    lm.model.save_pretrained(tmp_path / "planted")
    example = Path(__file__).resolve().parents[1] / "examples" / "gap_variant.py"
    try:
        rc = cli.main(["--plugin", str(example), "induction", "--model", str(tmp_path / "planted"), "--variant",
                       "gap", "--seq-len", "20", "--trials", "5", "--out", str(tmp_path / "out"), "--no-progress",
                       "--device", "cpu"])
        assert rc == 0
        df = pd.read_csv(tmp_path / "out" / "scores.csv")
        # planted lag 30 = n + GAP: the planted head finds the previous instance across the gap
        top = df[(df["target"] == "prev")].sort_values("mean").iloc[-1]
        assert (top["layer"], top["head"]) == (0, 0) and top["mean"] > 0.9
        assert cli.main(["induction", "--model", str(tmp_path / "planted"), "--variant", "nope",
                         "--out", str(tmp_path / "x")]) == 2
    finally:
        _REGISTRY.pop("gap", None)
