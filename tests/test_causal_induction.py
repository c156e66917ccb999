"""Induction for causal models: the variant registry serves decoders (no [MASK]; Olsson et al.'s prefix matching)."""

import pytest
import torch
from attnlab.core.errors import InputError
from attnlab.core.models import wrap_model
from attnlab.core.runs import run_experiment
from attnlab.induction import (
    RRTBatch,
    get_variant,
    make_protocol,
    register_variant,
    token_spec_for,
)
from attnlab.induction.experiment import INDUCTION, InductionConfig
from attnlab.induction.maps import compute as compute_induction
from attnlab.induction.variants import _REGISTRY, build_batch
from families import tiny_family
from planted import planted_lag_gpt2


def test_causal_standard_batch_reads_a_token_of_the_second_copy():
    lm = wrap_model(tiny_family("llama"))  # no tokenizer: ordinary ids are all but the config's BOS/EOS/PAD
    protocol = make_protocol("clean", token_spec_for(lm))
    assert protocol.causal and protocol.mask_id is None
    n = 20
    batch = build_batch(get_variant("standard"), protocol, 64, n, seed=0, max_positions=lm.max_positions)
    ids, q = batch.input_ids, batch.mask_index
    rows = torch.arange(64)
    assert (ids[:, 0] == lm.config.bos_token_id).all() and ids.shape[1] == 1 + 2 * n
    assert torch.equal(ids[:, 1:n + 1], ids[:, n + 1:])  # BOS X X, nothing masked
    assert ((q > n) & (q < 2 * n)).all()  # a token of the second copy, never its first or last
    assert torch.equal(batch.masked_token, ids[rows, q])
    prev, after = batch.targets["prev"], batch.targets["after"]
    assert torch.equal(ids[rows, prev], ids[rows, q]) and (prev < q).all()
    assert torch.equal(ids[rows, after], ids[rows, q + 1])  # prefix matching: what followed the earlier instance
    specials = {lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id}
    assert not any(int(t) in specials for t in ids[:, 1:].flatten())


@pytest.mark.parametrize("lag_for", ["after", "prev"])
def test_planted_causal_lag_head_scores_on_its_target(lag_for):
    n = 40
    lag = n - 1 if lag_for == "after" else n  # prefix matching: query - (n - 1); previous instance: query - n
    lm = wrap_model(planted_lag_gpt2(lag, positions=128))
    result = compute_induction(InductionConfig(model="planted", trials=24, seq_len=n, seed=1), lm)
    mean = result.scores.mean
    assert mean[lag_for][0, 0] >= 0.9
    other = "prev" if lag_for == "after" else "after"
    assert mean[other][0, 0] < 0.05
    assert mean[lag_for][0, 1] < 0.2 and mean[lag_for][1].max() < 0.2  # the other heads attend broadly


def test_mask_only_variants_refuse_a_causal_model_clearly():
    lm = wrap_model(tiny_family("gpt2"))
    with pytest.raises(InputError, match=r"variant 'triple' needs a \[MASK\].*causal.*variants for it: standard"):
        compute_induction(InductionConfig(model="gpt2", variant="triple", trials=2, seq_len=10), lm)
    with pytest.raises(InputError, match="protocol 'clean'"):
        compute_induction(InductionConfig(model="gpt2", protocol="paper", trials=2, seq_len=10), lm)


def test_a_plugin_declares_causal_support():
    @register_variant("lag2-test", ["two_back"], "two tokens back", modes=("causal",))
    def build(protocol, n_trials, n, g):
        x = protocol.draw(n_trials, n, g)
        ids, off = protocol.frame(torch.cat([x, x], dim=1))
        q = torch.full((n_trials,), off + n + 2)
        return RRTBatch.causal(ids, q, {"two_back": q - 2})

    try:
        lm = wrap_model(tiny_family("gpt_neox"))
        result = compute_induction(InductionConfig(model="neox", variant="lag2-test", trials=3, seq_len=8), lm)
        assert result.scores.mean["two_back"].shape == (lm.n_layers, lm.n_heads)
        with pytest.raises(InputError, match="needs a causal"):
            compute_induction(InductionConfig(model="bert", variant="lag2-test", trials=3, seq_len=8),
                              wrap_model(tiny_family("bert")))
        with pytest.raises(InputError, match="after the query"):
            RRTBatch.causal(torch.zeros(2, 5, dtype=torch.long), torch.tensor([2, 2]), {"x": torch.tensor([3, 1])})
    finally:
        _REGISTRY.pop("lag2-test", None)


def test_causal_run_writes_maps_and_says_what_the_query_is(tmp_path):
    lm = wrap_model(tiny_family("qwen2"))
    meta = run_experiment(INDUCTION, InductionConfig(model="qwen2-tiny", trials=4, seq_len=12), tmp_path / "q", lm=lm)
    assert meta["causal"] is True and "prefix" in meta["protocol_note"]
    assert (tmp_path / "q" / "induction_standard_after.png").exists()
