"""The extractor equals Hugging Face eager attention, one sequence at a time, within 1e-5 (fp32)."""

import copy

import pytest
import torch
from attnlab import extract_attention
from attnlab.core.errors import InputError
from attnlab.core.extractor import pad_sequences
from attnlab.core.models import wrap_model
from conftest import (
    eager_attention,
    eager_copy,
    tiny_bert,
    tiny_gpt2,
)


def _random_batch(vocab, lengths, n_queries, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad_sequences(seqs)
    qpos = torch.stack([torch.randint(0, n, (n_queries,), generator=g) for n in lengths])
    return seqs, ids, mask, qpos


def assert_matches_eager(lm_model, ref, seqs, ids, mask, qpos, **kw):
    rows = extract_attention(lm_model, ids, mask, qpos, **kw)
    assert rows.attention.shape == (len(seqs), qpos.shape[1], ref.config.num_hidden_layers,
                                    ref.config.num_attention_heads, ids.shape[1])
    for b, seq in enumerate(seqs):
        full = eager_attention(ref, seq)  # [L, H, S, S]
        for j, q in enumerate(qpos[b].tolist()):
            got = rows.attention[b, j]
            torch.testing.assert_close(got[..., : len(seq)], full[:, :, q, :], atol=1e-5, rtol=0)
            assert (got[..., len(seq):] == 0).all(), "padded keys must get zero attention"
            # the keys each layer let the row see: eager's non-zero entries (padding and causal masks), none beyond
            assert torch.equal(rows.visible[b, j, :, :len(seq)], full[:, 0, q, :] > 0)
            assert not rows.visible[b, j, :, len(seq):].any()
    return rows


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_tiny_bert_matches_eager_with_padding(batch_size):
    model = tiny_bert()
    ref = eager_copy(model)
    seqs, ids, mask, qpos = _random_batch(120, [40, 17, 33, 5, 40, 26], 3, seed=1)
    assert_matches_eager(wrap_model(model), ref, seqs, ids, mask, qpos, batch_size=batch_size)


def test_tiny_gpt2_causal_matches_eager_with_padding():
    model = tiny_gpt2()
    ref = eager_copy(model)
    seqs, ids, mask, qpos = _random_batch(120, [30, 12, 25, 30], 4, seed=2)
    rows = assert_matches_eager(wrap_model(model), ref, seqs, ids, mask, qpos, batch_size=2)
    # causal: nothing after the query position
    for b in range(len(seqs)):
        for j, q in enumerate(qpos[b].tolist()):
            assert (rows.attention[b, j, ..., q + 1:] == 0).all()


def test_real_minilm_weights_match_eager(minilm):
    ref = eager_copy(minilm.model)
    seqs, ids, mask, qpos = _random_batch(30000, [64, 40, 51], 2, seed=3)
    assert_matches_eager(minilm, ref, seqs, ids, mask, qpos, batch_size=2)


def test_all_positions_and_qk_vectors():
    model = tiny_bert()
    lm = wrap_model(model)
    seqs, ids, mask, _ = _random_batch(120, [12, 9], 1, seed=4)
    rows = extract_attention(lm, ids, mask, None, return_qk=True)
    assert rows.attention.shape == (2, 12, 3, 4, 12)
    assert rows.queries.shape == rows.keys.shape == (2, 12, 3, 4, 8)
    # rows rebuilt from the returned q/k equal the returned attention (sequence 0 has no padding)
    scores = torch.einsum("qlhd,klhd->qlhk", rows.queries[0], rows.keys[0]) / 8**0.5
    torch.testing.assert_close(scores.softmax(-1), rows.attention[0], atol=1e-6, rtol=0)


def test_chunking_is_deterministic_and_batch_independent():
    lm = wrap_model(tiny_bert())
    seqs, ids, mask, qpos = _random_batch(120, [20] * 7, 2, seed=5)
    a = extract_attention(lm, ids, mask, qpos, batch_size=3).attention
    b = extract_attention(lm, ids, mask, qpos, batch_size=3).attention
    c = extract_attention(lm, ids, mask, qpos, batch_size=7).attention
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


def test_memory_budget_picks_chunks():
    lm = wrap_model(tiny_bert())
    seqs, ids, mask, qpos = _random_batch(120, [20] * 5, 1, seed=6)
    small = extract_attention(lm, ids, mask, qpos, memory_budget_mb=0.05).attention
    big = extract_attention(lm, ids, mask, qpos, memory_budget_mb=1024).attention
    torch.testing.assert_close(small, big, atol=1e-6, rtol=0)


def test_bad_inputs_get_specific_errors():
    lm = wrap_model(tiny_bert(positions=32))
    with pytest.raises(InputError, match="longer than the model's 32 positions"):
        extract_attention(lm, torch.zeros(1, 40, dtype=torch.long), None, [0])
    with pytest.raises(InputError, match="query position 12 .* out of range"):
        extract_attention(lm, torch.zeros(1, 10, dtype=torch.long), None, [[12]])
    ids, mask = pad_sequences([[1, 2, 3], [4, 5]])
    with pytest.raises(InputError, match="padding cannot be a query"):
        extract_attention(lm, ids, mask, [[0], [2]])
    with pytest.raises(InputError, match="right-padded"):
        extract_attention(lm, ids, torch.tensor([[1, 1, 1], [0, 1, 1]]), [[0], [2]])
    with pytest.raises(InputError, match="token ids must lie in"):
        extract_attention(lm, torch.tensor([[1, 500]]), None, [[0]])
    with pytest.raises(InputError, match="shape"):
        extract_attention(lm, torch.zeros(2, 5, dtype=torch.long), None, torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_cuda_path_matches_cpu_eager(make):
    model = make()
    ref = eager_copy(model)
    lm = wrap_model(model.cuda())
    seqs, ids, mask, qpos = _random_batch(120, [40, 17, 33, 5], 3, seed=7)
    rows = extract_attention(lm, ids, mask, qpos, batch_size=3, return_scores=True, return_qk=True)
    cpu_rows = extract_attention(wrap_model(copy.deepcopy(model).cpu()), ids, mask, qpos, batch_size=3,
                                 return_scores=True, return_qk=True)
    for b, seq in enumerate(seqs):
        full = eager_attention(ref, seq)
        for j, q in enumerate(qpos[b].tolist()):
            torch.testing.assert_close(rows.attention[b, j, ..., : len(seq)], full[:, :, q, :], atol=1e-5, rtol=0)
    # every part is kept on the GPU during the pass and arrives on out_device (the CPU) in one transfer per chunk
    for name in ("attention", "scores", "queries", "keys"):
        part = getattr(rows, name)
        assert part.device.type == "cpu"
        torch.testing.assert_close(part, getattr(cpu_rows, name), atol=1e-4, rtol=1e-4)


def _bf16_matches_eager(make, device):
    model = make().to(torch.bfloat16)
    ref = eager_copy(model)  # HF eager in bf16: bf16 product, fp32 softmax, cast back to bf16
    lm = wrap_model(model.to(device))
    seqs, ids, mask, qpos = _random_batch(120, [40, 17, 33, 5], 3, seed=11)
    rows = extract_attention(lm, ids, mask, qpos, batch_size=3)
    assert rows.attention.dtype == torch.float32
    for b, seq in enumerate(seqs):
        full = eager_attention(ref, seq).float()
        for j, q in enumerate(qpos[b].tolist()):
            # bf16 keeps ~3 significant digits; the product is in bf16 in both, the softmax in fp32 in both
            torch.testing.assert_close(rows.attention[b, j, ..., : len(seq)], full[:, :, q, :], atol=1e-2, rtol=0)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_bf16_rows_match_eager_bf16_on_cpu(make):
    """The recorder computes q.k in the model's dtype (no fp32 copy of the keys) and the softmax in fp32."""
    _bf16_matches_eager(make, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_bf16_cuda_rows_match_eager(make):
    _bf16_matches_eager(make, "cuda")


def test_api_rejects_silent_truncation_and_bad_sizes(inside):
    from attnlab import extract_attention
    from attnlab.core.errors import InputError
    from attnlab.core.models import wrap_model

    lm = wrap_model(tiny_bert())
    ids = torch.randint(5, 100, (2, 10))
    bad = [dict(input_ids=ids.float()), dict(query_positions=torch.zeros(2, 1)),
           dict(attention_mask=torch.full((2, 10), 2)), dict(batch_size=0), dict(batch_size=-3),
           dict(memory_budget_mb=0), dict(memory_budget_mb=-1)]
    for kwargs in bad:
        call = {"input_ids": ids, **kwargs}
        with pytest.raises(InputError):
            extract_attention(lm, **call)
    rows = extract_attention(lm, ids, query_positions=torch.zeros(2, 0, dtype=torch.long))  # [B, 0]: empty rows
    assert rows.attention.shape == (2, 0, 3, 4, 10) and rows.visible.shape == (2, 0, 3, 10)


def test_chosen_layers_only_and_the_pass_stops_after_the_last(monkeypatch):
    """``layers=`` keeps those layers' rows (in the order given) and stops the forward pass after the last of them."""
    from attnlab.core import extractor

    lm = wrap_model(tiny_bert(layers=3))
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    full = extractor.extract_attention(lm, ids, return_scores=True)
    calls = []
    real = extractor._RowRecorder.record
    monkeypatch.setattr(extractor._RowRecorder, "record", lambda self, *a: calls.append(1) or real(self, *a))
    part = extractor.extract_attention(lm, ids, return_scores=True, layers=[1, 0])
    assert part.attention.shape == (2, 12, 2, 4, 12) and len(calls) == 2  # layer 2 never ran
    assert torch.equal(part.attention[:, :, 0], full.attention[:, :, 1])
    assert torch.equal(part.scores[:, :, 1], full.scores[:, :, 0])
    for bad in ([], [3], [-1]):
        with pytest.raises(InputError, match="layers must name"):
            extractor.extract_attention(lm, ids, layers=bad)
