"""Per-head weights rebuild the extractor's pre-softmax scores (BERT and GPT-2's fused c_attn)."""

import pytest
import torch
from attnlab import extract_attention, head_weights
from attnlab.core.activations import attention_inputs
from attnlab.core.models import wrap_model
from conftest import tiny_bert, tiny_gpt2


def _attention_inputs(lm, ids):
    return attention_inputs(lm, ids)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_scores_from_slices_equal_extractor(make):
    lm = wrap_model(make())
    ids = torch.randint(0, 120, (15,), generator=torch.Generator().manual_seed(0))
    w = head_weights(lm)
    assert w.W_Q.shape == (3, 4, 32, 8) and w.W_O.shape == (3, 4, 8, 32) and w.b_O.shape == (3, 32)
    x = _attention_inputs(lm, ids)
    q = torch.einsum("lsm,lhmd->lhsd", x, w.W_Q) + w.b_Q[:, :, None]
    k = torch.einsum("lsm,lhmd->lhsd", x, w.W_K) + w.b_K[:, :, None]
    rebuilt = torch.einsum("lhqd,lhkd->qlhk", q, k) * w.scaling[None, :, None, None]
    got = extract_attention(lm, ids[None], None, None, return_scores=True, return_attention=False).scores[0]
    torch.testing.assert_close(got, rebuilt, atol=1e-5, rtol=1e-5)


def test_value_and_output_slices_rebuild_attention_output():
    """sum_h softmax(...) (x W_V + b_V) W_O + b_O equals the model's attention sublayer (dense) output."""
    lm = wrap_model(tiny_bert())
    ids = torch.randint(0, 120, (10,), generator=torch.Generator().manual_seed(1))
    w = head_weights(lm)
    x = _attention_inputs(lm, ids)[1]  # layer 1
    attn = extract_attention(lm, ids[None], None, None).attention[0, :, 1]  # [Q, H, K]
    v = torch.einsum("sm,hmd->hsd", x, w.W_V[1]) + w.b_V[1][:, None]
    z = torch.einsum("qhk,hkd->qhd", attn, v)
    out = torch.einsum("qhd,hdm->qm", z, w.W_O[1]) + w.b_O[1]
    layer = lm.base.encoder.layer[1].attention
    with torch.no_grad():
        ctx = layer.self(x[None])[0][0]
        expected = layer.output.dense(ctx)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "albert", "gpt2", "llama"])
def test_one_layers_weights_are_that_layers_slice_of_every_layers(family):
    """layer_weights (read for one layer: the first-layer decomposition) holds head_weights' numbers for that
    layer: fused (GPT-2), shared (ALBERT) and grouped-query (Llama) layouts included."""
    from attnlab.core.weights import layer_weights
    from families import tiny_family

    lm = wrap_model(tiny_family(family))
    every = head_weights(lm, dtype=torch.float64)
    for layer in range(lm.n_layers):
        one = layer_weights(lm, layer, dtype=torch.float64)
        for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O"):
            assert torch.equal(getattr(one, name), getattr(every, name)[layer]), (family, layer, name)
        assert one.scaling == float(every.scaling[layer])
