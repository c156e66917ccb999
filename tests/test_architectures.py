"""Every architecture family against Hugging Face eager attention, and its weights against its own scores.

One tiny random model per family, built from its config class (no download): the extractor's rows equal
eager ``output_attentions`` within 1e-5 on a right-padded batch, and the family record's per-head weights
rebuild the pre-softmax scores the model computed (through the rotation on rotary families) and, with the
attention rows, the heads' outputs.
"""

import pytest
import torch
from attnlab import extract_attention
from attnlab.circuits.ablation import head_outputs
from attnlab.core.activations import attention_inputs
from attnlab.core.errors import UnsupportedModelError
from attnlab.core.extractor import pad_sequences
from attnlab.core.models import check_supported, wrap_model
from attnlab.core.weights import head_weights
from conftest import eager_attention, eager_copy
from families import FAMILIES, VOCAB, tiny_family


def _batch(lengths, n_queries, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]  # no pad/special ids
    ids, mask = pad_sequences(seqs)
    qpos = torch.stack([torch.randint(0, n, (n_queries,), generator=g) for n in lengths])
    return seqs, ids, mask, qpos


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_equal_eager_with_padding(family):
    model = tiny_family(family)
    ref = eager_copy(model)
    lm = wrap_model(model)
    seqs, ids, mask, qpos = _batch([30, 12, 25, 30, 7], 4, seed=1)
    rows = extract_attention(lm, ids, mask, qpos, batch_size=2)
    assert rows.attention.shape == (5, 4, lm.n_layers, lm.n_heads, 30)
    for b, seq in enumerate(seqs):
        full = eager_attention(ref, seq)  # [L, H, S, S]
        for j, q in enumerate(qpos[b].tolist()):
            got = rows.attention[b, j]
            torch.testing.assert_close(got[..., : len(seq)], full[:, :, q, :], atol=1e-5, rtol=0)
            assert (got[..., len(seq):] == 0).all()
            if lm.is_causal:
                assert (got[..., q + 1:] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_weights_rebuild_scores_and_head_outputs(family):
    lm = wrap_model(tiny_family(family, seed=3))
    seq = torch.randint(3, VOCAB, (21,), generator=torch.Generator().manual_seed(4))
    rows = extract_attention(lm, seq, return_scores=True, return_qk=True)
    w = head_weights(lm)
    assert w.W_Q.shape == (lm.n_layers, lm.n_heads, lm.d_model, lm.d_head)
    assert w.W_K.shape == w.W_V.shape == w.W_Q.shape and w.W_O.shape == (lm.n_layers, lm.n_heads, lm.d_head, lm.d_model)
    x = attention_inputs(lm, seq)  # [L, S, D]
    q = torch.einsum("lsm,lhmd->lhsd", x, w.W_Q) + w.b_Q[:, :, None]  # [L, H, S, d], pre-rotary
    k = torch.einsum("lsm,lhmd->lhsd", x, w.W_K) + w.b_K[:, :, None]
    v = torch.einsum("lsm,lhmd->lhsd", x, w.W_V) + w.b_V[:, :, None]
    if lm.arch.positions == "rotary":
        positions = torch.arange(len(seq))[None]
        rotated = [lm.arch.rotate(lm, layer, q[layer][None], k[layer][None], positions) for layer in range(lm.n_layers)]
        q = torch.stack([r[0][0] for r in rotated])
        k = torch.stack([r[1][0] for r in rotated])
    torch.testing.assert_close(q, rows.queries[0].permute(1, 2, 0, 3), atol=1e-5, rtol=0)  # the q/k the model dots
    torch.testing.assert_close(k, rows.keys[0].permute(1, 2, 0, 3), atol=1e-5, rtol=0)
    scores = torch.einsum("lhqd,lhkd->qlhk", q, k) * w.scaling[None, :, None, None]
    torch.testing.assert_close(scores, rows.scores[0], atol=1e-5, rtol=0)
    z = head_outputs(lm, seq[None])  # {layer: [1, S, H, d]}
    for layer in range(lm.n_layers):
        want = torch.einsum("qhk,hkd->qhd", rows.attention[0, :, layer], v[layer])
        torch.testing.assert_close(z[layer][0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt_neox", "modernbert", "distilbert"])
def test_output_projection_rebuilds_the_attention_output(family):
    """W_O and b_O: the sum over heads of z_h W_O[h], plus b_O, is what the output projection makes of the
    heads' outputs; zeroing every head of a layer zeroes its outputs."""
    from attnlab import ablate

    lm = wrap_model(tiny_family(family, seed=5))
    seq = torch.randint(3, VOCAB, (1, 15), generator=torch.Generator().manual_seed(6))
    w = head_weights(lm)
    z = head_outputs(lm, seq)
    proj = {"bert": lambda m, i: m.encoder.layer[i].attention.output.dense,
            "llama": lambda m, i: m.layers[i].self_attn.o_proj, "gpt_neox": lambda m, i: m.layers[i].attention.dense,
            "modernbert": lambda m, i: m.layers[i].attn.Wo,
            "distilbert": lambda m, i: m.transformer.layer[i].attention.out_lin}[family]
    for layer in range(lm.n_layers):
        with torch.no_grad():
            got = proj(lm.base, layer)(z[layer].clone().reshape(1, 15, -1))
        want = torch.einsum("bshd,hdm->bsm", z[layer], w.W_O[layer]) + w.b_O[layer]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with ablate(lm, [(0, h) for h in range(lm.n_heads)]):
        assert (head_outputs(lm, seq)[0] == 0).all()


def test_modernbert_local_layers_put_no_weight_outside_the_window():
    model = tiny_family("modernbert")
    lm = wrap_model(model)
    half = model.config.local_attention // 2
    seq = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(7))
    att = extract_attention(lm, seq).attention[0]  # [S, L, H, S]
    dist = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs()  # [q, k]
    outside = dist > half
    for layer, kind in enumerate(model.config.layer_types):
        a = att[:, layer].permute(1, 0, 2)  # [H, q, k]
        if kind == "sliding_attention":
            assert (a[:, outside] == 0).all()
            assert (a[:, ~outside] > 0).all()
        else:
            assert (a[:, outside] > 0).all()  # a global layer reaches every key
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types


def test_a_sliding_window_layers_chance_is_one_over_its_window_not_one_over_the_sequence():
    """The extractor reports which keys each row saw per layer, from the model's own masks; the detectors' chance
    follows it. A head uniform over its window scores exactly its chance on a local layer: with one chance for the
    whole model (1 / S, as before) it would be a previous-token head 0.09 over chance."""
    from attnlab.circuits.scores import detector_scores

    model = tiny_family("modernbert")
    lm = wrap_model(model)
    half = model.config.local_attention // 2
    s = 40
    seq = torch.randint(3, VOCAB, (2, s), generator=torch.Generator().manual_seed(9))
    rows = extract_attention(lm, seq)
    near = (torch.arange(s)[:, None] - torch.arange(s)[None, :]).abs() <= half  # [q, k]
    local = [kind == "sliding_attention" for kind in model.config.layer_types]
    for layer, is_local in enumerate(local):
        assert torch.equal(rows.visible[:, :, layer], (near if is_local else torch.ones(s, s, dtype=torch.bool))
                           .expand(2, s, s))
    uniform = rows.visible.double() / rows.visible.double().sum(-1, keepdim=True)  # [B, Q, L, S]
    uniform = uniform[:, :, :, None, :].expand(-1, -1, -1, lm.n_heads, -1)
    specials = {"cls": None, "sep": None, "mask": None}
    det = detector_scores(uniform, seq, specials, visible=rows.visible)
    score, chance, corrected = det["previous_token"]
    assert corrected.abs().max() < 1e-12
    interior = 1 / (2 * half + 1)  # most queries see the whole window; the first and last see less of it
    for layer, is_local in enumerate(local):
        assert chance[layer] == pytest.approx(interior if is_local else 1 / s, rel=0.15 if is_local else 1e-12)
    assert chance[local.index(True)] > 4 * chance[local.index(False)]
    old = detector_scores(uniform, seq, specials)["previous_token"][2]  # every key assumed visible
    assert old[local.index(True)].min() > 0.08


def test_the_induction_maps_chance_is_each_layers_own_in_a_sliding_window_model():
    """The previous instance lies beyond a ModernBERT local layer's window: uniform attention there puts 0 on it
    (scores.csv's chance for that layer), while a global layer's chance stays 1 / S; the verdict's number is the
    global one."""
    from attnlab.induction.protocols import TokenSpec, make_protocol
    from attnlab.induction.scores import induction_scores, target_stats
    from attnlab.induction.variants import build_batch, get_variant

    model = tiny_family("modernbert")
    lm = wrap_model(model)
    n = 3 * model.config.local_attention  # the copy lies 3 windows away
    spec = TokenSpec(1, 2, 3, torch.arange(5, VOCAB), VOCAB)  # the family's [CLS], [SEP], [MASK]
    batch = build_batch(get_variant("standard"), make_protocol("clean", spec), 6, n, seed=0)
    scores = induction_scores(lm, batch)
    s = batch.input_ids.shape[1]
    for layer, kind in enumerate(model.config.layer_types):
        for target in ("prev", "before", "after"):
            got = scores.layer_chance[target][:, layer]
            assert torch.equal(got, torch.zeros(6, dtype=got.dtype)) if kind == "sliding_attention" else \
                torch.allclose(got, torch.full((6,), 1 / s, dtype=got.dtype))
            if kind == "sliding_attention":
                assert (scores.per_trial[target][:, layer] == 0).all()  # it cannot attend there at all
    st = target_stats(scores.per_trial["prev"].numpy(), scores.per_trial["prev"].numpy(), scores.chance.numpy(), 0,
                      scores.layer_chance["prev"].numpy())
    assert st.chance == pytest.approx(1 / s) and list(st.layer_chance) == [
        0.0 if kind == "sliding_attention" else pytest.approx(1 / s) for kind in model.config.layer_types]


def test_albert_shared_layers_give_identical_weights_and_distinct_rows():
    model = tiny_family("albert")
    lm = wrap_model(model)
    w = head_weights(lm)
    for layer in range(1, lm.n_layers):
        for name in ("W_Q", "b_Q", "W_K", "W_V", "W_O", "b_O"):
            assert torch.equal(getattr(w, name)[layer], getattr(w, name)[0])
    seq = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(8))
    att = extract_attention(lm, seq, torch.ones(12, dtype=torch.long)[None].long()).attention[0]
    # same weights, different inputs per layer: the rows differ, and each layer is the eager one
    assert not torch.allclose(att[:, 0], att[:, 1])
    torch.testing.assert_close(att.permute(1, 2, 0, 3), eager_attention(eager_copy(model), seq.tolist()), atol=1e-5,
                               rtol=0)


def test_albert_ablation_and_recording_follow_the_shared_module():
    """Shared modules are told apart by call order: ablating layer 1 only changes layers after it."""
    from attnlab import ablate

    lm = wrap_model(tiny_family("albert"))
    seq = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(9))
    clean = extract_attention(lm, seq, query_positions=torch.tensor([[5]])).attention
    with ablate(lm, [(1, 0)]):
        ablated = extract_attention(lm, seq, query_positions=torch.tensor([[5]])).attention
        again = extract_attention(lm, seq, query_positions=torch.tensor([[5]])).attention  # counters stay in step
    assert torch.equal(ablated[:, :, :2], clean[:, :, :2])
    assert not torch.allclose(ablated[:, :, 2], clean[:, :, 2])
    assert torch.equal(again, ablated)


@pytest.mark.parametrize("model_type, cls", [("deberta", "DebertaConfig"), ("deberta-v2", "DebertaV2Config")])
def test_deberta_is_refused_with_the_reason(model_type, cls):
    import transformers

    with pytest.raises(UnsupportedModelError, match="disentangled"):
        check_supported(getattr(transformers, cls)())


def test_a_transformers_release_older_than_the_familys_floor_is_refused_up_front(monkeypatch):
    """Floors found by running this file against each release: ModernBERT routes its attention through the
    registry from 5.7, GPT-2 has ``scaling`` from 5.4, the others work from 5.0."""
    from attnlab.core import architectures

    monkeypatch.setattr(architectures, "installed_transformers", lambda: "5.5.0")
    with pytest.raises(UnsupportedModelError, match=r"modernbert family needs transformers >= 5\.7\.0 \(found 5\.5\.0\)"):
        check_supported(tiny_family("modernbert").config)
    check_supported(tiny_family("gpt2").config)
    monkeypatch.setattr(architectures, "installed_transformers", lambda: "5.3.0")
    with pytest.raises(UnsupportedModelError, match=r"gpt2 family needs transformers >= 5\.4\.0"):
        check_supported(tiny_family("gpt2").config)
    check_supported(tiny_family("bert").config)


def test_attention_that_bypasses_the_hook_point_is_refused_not_half_read():
    """A model whose attention does not pass through attnlab_sdpa (here: switched back to eager after wrapping)
    would leave layers unrecorded; the extractor says so instead of failing deep inside."""
    lm = wrap_model(tiny_family("bert"))
    lm.model.set_attn_implementation("eager")
    with pytest.raises(UnsupportedModelError, match=r"layer\(s\) 0, 1, 2 .* did not pass through"):
        extract_attention(lm, torch.tensor([[5, 6, 7, 8]]), query_positions=torch.tensor([[1]]))


def test_unknown_family_lists_the_supported_ones():
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError, match="t5.*llama"):
        check_supported(T5Config())


def test_roberta_positions_start_after_the_padding_index():
    lm = wrap_model(tiny_family("roberta"))
    assert lm.max_positions == 66 - 2  # position ids count from pad_token_id + 1
    extract_attention(lm, torch.randint(3, VOCAB, (64,)))
    with pytest.raises(Exception, match="64 positions"):
        extract_attention(lm, torch.randint(3, VOCAB, (65,)))


def test_grouped_query_keys_are_repeated_per_query_head():
    lm = wrap_model(tiny_family("mistral"))  # 4 query heads share 1 key/value head
    assert lm.n_kv_heads == 1
    seq = torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(10))
    keys = extract_attention(lm, seq, return_qk=True, return_attention=False).keys[0]  # [S, L, H, d]
    for h in range(1, lm.n_heads):
        assert torch.equal(keys[:, :, h], keys[:, :, 0])
    w = head_weights(lm)
    assert torch.equal(w.W_K[:, 1], w.W_K[:, 0]) and torch.equal(w.W_V[:, 3], w.W_V[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_is_found(family):
    model = tiny_family(family)
    lm = wrap_model(model)
    head = lm.lm_head()
    assert head is not None and lm.has_lm_head
    seq = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        hidden = lm.base(input_ids=seq).last_hidden_state
        torch.testing.assert_close(head(hidden), model(input_ids=seq).logits, atol=1e-5, rtol=0)


def test_device_map_loads_and_extracts_the_same_rows(tmp_path):
    """--device-map auto (accelerate): on this machine everything lands on the CPU; the rows are those of a
    plain load (on a multi-GPU machine the layers spread out and the extractor gathers the rows the same way)."""
    pytest.importorskip("accelerate")
    from attnlab.core.models import load_model

    tiny_family("llama").save_pretrained(tmp_path / "llama")
    plain = load_model(str(tmp_path / "llama"), device="cpu")
    mapped = load_model(str(tmp_path / "llama"), device="map:auto")
    assert mapped.meta["device"] == "map:auto"
    seqs, ids, mask, qpos = _batch([20, 9], 3, seed=11)
    a = extract_attention(plain, ids, mask, qpos).attention
    b = extract_attention(mapped, ids, mask, qpos).attention
    assert torch.equal(a, b)
    with pytest.raises(Exception, match="unknown device map"):
        load_model(str(tmp_path / "llama"), device="map:everywhere")


def test_heads_runs_on_other_families_and_says_what_it_skipped(tmp_path, bert_tokenizer):
    """`heads` on a RoBERTa masked LM (BERT-style layers: every score, DLA included) and on a Llama (weight and
    pattern scores; DLA and the scan are skipped with the reason)."""
    import transformers
    from attnlab.circuits.experiment import HEADS, HeadsConfig
    from attnlab.core.runs import run_experiment

    torch.manual_seed(0)
    roberta = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=bert_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=80, pad_token_id=0))
    meta = run_experiment(HEADS, HeadsConfig(model="roberta", seq_len=10, trials=2, detector_trials=2), tmp_path / "r",
                     lm=wrap_model(roberta, tokenizer=bert_tokenizer))
    assert {"dla", "ablation_copying_gain", "ov_copying", "prefix_matching"} <= set(meta["top_heads"])
    # nothing skipped but the path tracing, which a random model gives no induction-like head to trace into
    assert meta["notes"] == ["paths: no head past layer 0 has a induction_at_mask score of 0.1 over chance, so no key "
                             "or query path was traced"]
    meta = run_experiment(HEADS, HeadsConfig(model="llama", seq_len=10, trials=2, detector_trials=2), tmp_path / "l",
                     lm=wrap_model(tiny_family("llama")))
    assert "llama is not one" in meta["notes"][0] and "dla" not in meta["top_heads"]
    assert {"ov_copying", "prefix_matching", "previous_token"} <= set(meta["top_heads"])


def test_electra_discriminator_loads_as_encoder_and_has_no_masked_lm_head(tmp_path):
    """An ELECTRA discriminator checkpoint reads as an encoder; asking it for the masked-LM head (the
    generator's) is a MissingHeadError, not a randomly initialised head. The generator loads with its head."""
    import transformers
    from attnlab.core.errors import MissingHeadError
    from attnlab.core.models import load_model

    cfg = transformers.ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    transformers.ElectraForPreTraining(cfg).save_pretrained(tmp_path / "disc")
    tiny_family("electra").save_pretrained(tmp_path / "gen")
    disc = load_model(str(tmp_path / "disc"), device="cpu")
    assert disc.n_layers == 2 and disc.lm_head() is None
    with pytest.raises(MissingHeadError, match="masked-LM head"):
        load_model(str(tmp_path / "disc"), masked_lm=True, device="cpu")
    gen = load_model(str(tmp_path / "gen"), masked_lm=True, device="cpu")
    assert gen.lm_head() is not None and gen.has_lm_head
