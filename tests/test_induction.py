"""Induction maps: planted ground truth, target identity, reproducibility, equivalence on real weights."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from attnlab.core.errors import InputError
from attnlab.core.models import wrap_model
from attnlab.core.runs import run_experiment
from attnlab.induction import (
    TokenSpec,
    get_variant,
    induction_scores,
    make_protocol,
    register_variant,
)
from attnlab.induction.experiment import INDUCTION, InductionConfig
from attnlab.induction.variants import _REGISTRY, RRTBatch, build_batch
from conftest import eager_attention, eager_copy, tiny_bert, tiny_gpt2
from planted import planted_lag_bert

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


def test_without_the_final_sep_the_sequences_and_targets_are_the_same_but_for_the_last_token():
    """end_sep=False (a masked LM trained without an end marker) drops only the closing [SEP]: the same seed gives
    the same tokens, [MASK] positions, targets and null, one column shorter."""
    from attnlab.induction.variants import build_null

    with_sep, without = make_protocol("clean", SPEC), make_protocol("clean", SPEC, end_sep=False)
    for name in ("standard", "shuffled", "triple"):
        v = get_variant(name)
        a, b = (build_batch(v, p, 16, 20, seed=4) for p in (with_sep, without))
        assert (a.input_ids[:, -1] == 102).all() and (b.input_ids[:, -1] != 102).all()
        assert torch.equal(a.input_ids[:, :-1], b.input_ids) and torch.equal(a.mask_index, b.mask_index)
        assert a.targets.keys() == b.targets.keys() and all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
        assert torch.equal(build_null(v, with_sep, a, 20, 4)[:, :-1], build_null(v, without, b, 20, 4))
    no_sep = TokenSpec(1, None, 3, torch.arange(5, 100), 100)  # a masked tokenizer without [SEP]
    with pytest.raises(InputError, match=r"needs \[SEP\]"):
        make_protocol("clean", no_sep)
    assert build_batch(get_variant("standard"), make_protocol("clean", no_sep, end_sep=False), 2, 10, 0).input_ids.shape[1] == 21
    with pytest.raises(InputError, match="protocol 'paper' has no final"):
        make_protocol("paper", SPEC, end_sep=False)
    with pytest.raises(InputError, match="use protocol 'clean'"):
        InductionConfig(protocol="paper", end_sep=False)


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
    run_experiment(INDUCTION, cfg, tmp_path / "a", lm=lm)
    run_experiment(INDUCTION, cfg, tmp_path / "b", lm=lm)
    a, b = np.load(tmp_path / "a" / "trials.npz"), np.load(tmp_path / "b" / "trials.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key
    assert (tmp_path / "a" / "scores.csv").read_bytes() == (tmp_path / "b" / "scores.csv").read_bytes()


def test_outputs_and_reuse(tmp_path):
    lm = wrap_model(planted_lag_bert(lag=25))
    cfg = InductionConfig(model="planted", variant="standard", trials=6, seq_len=25, seed=1)
    meta = run_experiment(INDUCTION, cfg, tmp_path, lm=lm)
    df = pd.read_csv(tmp_path / "scores.csv")
    assert list(df.columns) == ["model", "variant", "protocol", "target", "layer", "head", "mean", "sem", "ci_low",
                                "ci_high", "chance", "null_mean", "lift", "top_trial_share", "named", "n_trials",
                                "share_r0"]
    assert len(df) == 3 * 2 * 2 and set(df.target) == {"prev", "before", "after"}
    z = np.load(tmp_path / "trials.npz")
    assert z["input_ids"].shape == (6, 52) and z["attention_prev"].shape == (6, 2, 2)
    assert z["null_input_ids"].shape == (6, 52) and z["null_attention_prev"].shape == (6, 2, 2)
    assert np.allclose(df["chance"], 1 / 52)  # uniform attention over the 52 keys every [MASK] sees
    assert np.allclose(df["lift"], df["mean"] - df["null_mean"], atol=1e-6)
    for _, r in df.iterrows():  # every column is what the saved trials give
        x, x0 = z[f"attention_{r['target']}"][:, r["layer"], r["head"]], z[f"null_attention_{r['target']}"][:, r["layer"], r["head"]]
        assert r["null_mean"] == pytest.approx(x0.mean(), abs=1e-6)
        assert r["top_trial_share"] == pytest.approx(x.max() / x.sum(), abs=1e-6)
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]
    assert {"target_index_prev", "target_index_before", "target_index_after", "mask_index"} <= set(z.files)
    for t in ("prev", "before", "after"):
        assert (tmp_path / f"induction_standard_{t}.png").stat().st_size > 5000
    row = df[(df["target"] == "prev") & (df["layer"] == 0) & (df["head"] == 0)].iloc[0]
    assert row["mean"] == pytest.approx(z["attention_prev"][:, 0, 0].mean(), abs=1e-6)
    assert row["sem"] == pytest.approx(z["attention_prev"][:, 0, 0].std(ddof=1) / np.sqrt(6), abs=1e-6)
    assert json.loads((tmp_path / "meta.json").read_text())["config"]["seed"] == 1
    # the interactive view's rows are the scored rows: read at a target they give that target's scores
    rows = z["view_rows"].astype(np.float32)  # [6, L, H, S]: VIEW_TRIALS (6 of the 6 trials here)
    for t in range(rows.shape[0]):
        for target in ("prev", "before", "after"):
            np.testing.assert_allclose(rows[t, :, :, z[f"target_index_{target}"][t]], z[f"attention_{target}"][t],
                                       atol=2e-3)  # float16 storage
    assert z["view_tokens"].shape == (6, 52) and z["view_masked"].shape == (6,)
    # per head and target, the trial that contributes most: the argmax over all trials, and its row of that head
    for target in ("prev", "before", "after"):
        scores, which, top = z[f"attention_{target}"], z[f"top_trial_{target}"], z[f"top_rows_{target}"]
        np.testing.assert_array_equal(which, scores.argmax(0))
        for layer in range(2):
            for head in range(2):
                t = which[layer, head]
                np.testing.assert_array_equal(top[layer, head], z["view_rows"][t, layer, head])
    assert set(z["input_ids"][:6].ravel()) <= set(z["view_vocab_ids"]) and len(z["view_vocab_tokens"]) == len(
        z["view_vocab_ids"])
    again = run_experiment(INDUCTION, cfg, tmp_path, lm=lm)  # the same model (by content): finished work is reused
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


# ---------------------------------------------------------------- chance, null, CI and the verdict


def test_the_null_keeps_positions_and_the_query_and_removes_the_repeat():
    from attnlab.induction.variants import build_null

    for name, protocol in (("standard", "clean"), ("shuffled", "clean"), ("triple", "clean"), ("standard", "paper")):
        v = get_variant(name)
        proto = make_protocol(protocol, SPEC)
        n = v.n_for(protocol, 30)
        b = build_batch(v, proto, 16, n, seed=3)
        null = build_null(v, proto, b, n, seed=3)
        assert null.shape == b.input_ids.shape and torch.equal(null, build_null(v, proto, b, n, seed=3))
        rows = torch.arange(16)
        assert torch.equal(null[rows, b.mask_index], b.input_ids[rows, b.mask_index])  # the query as it was
        for t in range(16):
            real = b.input_ids[t].clone()
            real[b.mask_index[t]] = b.masked_token[t]
            fresh = [int(x) for i, x in enumerate(null[t]) if int(x) != int(b.input_ids[t, i])]
            assert not set(fresh) & set(real.tolist()), (name, protocol)  # fresh tokens occur nowhere in the trial
            if protocol == "clean":  # (the paper protocol draws X with replacement: X itself may repeat a token)
                body = [int(x) for x in null[t] if int(x) not in (101, 102, 103)]
                assert len(body) == len(set(body)), name  # nothing repeats
                assert int(b.masked_token[t]) not in [int(x) for x in null[t]]
            if name in ("standard", "shuffled"):  # the query's own copy is untouched: only the repeat is gone
                assert torch.equal(null[t, 1 + n:1 + 2 * n], b.input_ids[t, 1 + n:1 + 2 * n])
                assert len(fresh) >= n - 1


def _uniform_bert(layers=2, heads=2, causal=False):
    """A model whose every head attends uniformly (all query and key weights zero)."""
    model = tiny_bert(layers=layers, heads=heads, vocab_size=30522, positions=256) if not causal else \
        tiny_gpt2(layers=layers, heads=heads, vocab_size=500, positions=256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("query", "key")):
                p.zero_()
            if "c_attn" in name:  # GPT-2: q and k are the first two thirds of the fused projection
                p[..., : 2 * p.shape[-1] // 3].zero_()
    return wrap_model(model)


@pytest.mark.parametrize("causal", [False, True])
def test_a_uniform_head_has_zero_lift_and_is_never_named(tmp_path, causal):
    from attnlab.induction.maps import compute

    lm = _uniform_bert(causal=causal)
    result = compute(InductionConfig(model="uniform", trials=12, seq_len=20), lm)
    for target, st in result.stats.items():
        assert np.abs(st.lift).max() < 1e-6, target
        assert not st.named(0.1).any()
        if causal:
            expected = (1 / (result.batch.mask_index.double() + 1)).mean().item()
        else:
            expected = 1 / result.batch.input_ids.shape[1]
        assert st.chance == pytest.approx(expected, rel=1e-9)
        assert np.allclose(st.mean, st.chance, atol=1e-6)  # uniform attention is exactly its chance level


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_a_random_model_gets_verdict_none_for_every_target(tmp_path, kind):
    lm = wrap_model(tiny_bert(vocab_size=30522, positions=256, seed=3)) if kind == "masked" else \
        wrap_model(tiny_gpt2(vocab_size=500, positions=256, seed=3))
    meta = run_experiment(INDUCTION, InductionConfig(model=f"random-{kind}", trials=16, seq_len=30), tmp_path, lm=lm)
    assert meta["verdict"] and all(v["heads"] == [] for v in meta["verdict"].values())
    assert all("none - strongest" in line for line in INDUCTION.describe(meta)[2:])


def test_the_planted_circuit_verdict_names_exactly_its_induction_head(tmp_path):
    """L1H0 of the planted circuit attends from [MASK] to the previous instance only when there is one: it is
    named for 'prev'. The previous-token head L0H0 and the idle heads are not; nothing is named elsewhere."""
    from planted import planted_induction_circuit

    lm = wrap_model(planted_induction_circuit())
    meta = run_experiment(INDUCTION, InductionConfig(model="planted", trials=24, seq_len=25), tmp_path, lm=lm)
    assert meta["verdict"]["prev"]["heads"] == ["L1H0"]
    assert meta["verdict"]["before"]["heads"] == [] and meta["verdict"]["after"]["heads"] == []
    named = meta["verdict"]["prev"]["named"][0]
    assert named["lift"] > 0.5 and named["ci"][0] > named["null"] and named["top_trial_share"] < 0.5


def test_a_head_the_repeat_turns_away_is_reported_and_never_named(tmp_path):
    """The planted induction head with its query-key match negated avoids the previous instance (0 against a null
    of ~0.08): the verdict names nothing and reports L1H0, alone, as turned away from prev (AVOID_RULE); the heads
    that never looked there (null below chance) are not reported."""
    from planted import planted_induction_circuit

    model = planted_induction_circuit()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.weight[0:64, 128:192] *= -1
    meta = run_experiment(INDUCTION, InductionConfig(model="anti", trials=24, seq_len=25), tmp_path,
                          lm=wrap_model(model))
    v = meta["verdict"]
    assert all(t["heads"] == [] for t in v.values())
    assert [e["head"] for e in v["prev"]["avoided"]] == ["L1H0"] and v["before"]["avoided"] == []
    away = v["prev"]["avoided"][0]
    assert away["ci"][1] < away["null"] and away["mean"] <= away["null"] / 2 and away["null"] >= v["prev"]["chance"]
    lines = INDUCTION.describe(meta)
    assert "the repeat turns L1H0" in next(line for line in lines if line.strip().startswith("prev:"))
    assert any("turned away when mean <= null / 2" in line for line in lines)
    planted = run_experiment(INDUCTION, InductionConfig(model="planted", trials=24, seq_len=25), tmp_path / "p",
                             lm=wrap_model(planted_induction_circuit()))
    assert all(t["avoided"] == [] for t in planted["verdict"].values())  # the real induction head is not


def test_a_positional_head_is_not_an_induction_head():
    """The planted lag head attends to position q - n whatever the tokens: the map shows ~1 at 'prev', but its
    null is ~1 too, so the lift is ~0 and the verdict names nothing."""
    from attnlab.induction.maps import compute

    n = 40
    result = compute(InductionConfig(model="lag", trials=20, seq_len=n), wrap_model(planted_lag_bert(lag=n)))
    st = result.stats["prev"]
    assert st.mean[0, 0] > 0.9 and st.null[0, 0] > 0.9 and abs(st.lift[0, 0]) < 0.05
    assert not st.named(0.1).any()


def test_one_outlier_trial_is_flagged_and_kept_out_of_the_verdict():
    from attnlab.induction.scores import target_stats, verdict

    per_trial = np.zeros((10, 1, 2))
    per_trial[:, 0, 1] = 0.5  # a consistent head
    per_trial[3, 0, 0] = 0.95  # one trial carries everything (the r = 0 case of Figure 7b)
    stats = target_stats(per_trial, np.zeros_like(per_trial), np.full(10, 0.01), seed=0)
    assert stats.top_trial_share[0, 0] == pytest.approx(1.0) and stats.top_trial_share[0, 1] == pytest.approx(0.1)
    v = verdict(stats, 0.05)
    assert v["heads"] == ["L0H1"]  # the outlier head's mean 0.095 passes the lift, but one trial is all of it
    assert stats.mean[0, 0] == pytest.approx(0.095) and stats.lift[0, 0] > 0.05


def test_the_top_trial_is_the_same_however_trials_are_streamed():
    """The trial that contributes most (per head and target) and its row do not depend on how many trials go
    through the extractor at a time: the running maximum over passes equals the argmax over all trials."""
    from attnlab.induction.protocols import token_spec_for
    from planted import planted_induction_circuit

    lm = wrap_model(planted_induction_circuit())
    protocol = make_protocol("clean", token_spec_for(lm))
    batch = build_batch(get_variant("standard"), protocol, 9, 20, 3, max_positions=lm.max_positions)
    whole = induction_scores(lm, batch, keep_rows=2)
    streamed = induction_scores(lm, batch, keep_rows=2, trials_per_pass=2)
    for target, (which, row) in whole.top.items():
        np.testing.assert_array_equal(which.numpy(), whole.per_trial[target].argmax(0).numpy())
        np.testing.assert_array_equal(streamed.top[target][0].numpy(), which.numpy())
        torch.testing.assert_close(streamed.top[target][1], row)
