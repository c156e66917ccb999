"""Issue #14 (first part): head ablation through the one hook point, the rrt task and the prefix-reusing scan."""

import copy

import pytest
import torch
from conftest import tiny_bert

import attnlab
from attnlab.circuits.ablation import head_outputs, parse_heads
from attnlab.circuits.tasks import rrt_metrics, rrt_task, scan_rrt
from attnlab.core.errors import InputError
from attnlab.core.models import wrap_model


@pytest.fixture(scope="module")
def mlm():
    lm = wrap_model(tiny_bert(masked_lm=True, vocab_size=30522, layers=3, heads=4, hidden=32, positions=128))
    return lm


def _eager_with(model, edit):
    """The slow, obvious reference: a deep copy with eager attention and weights edited by ``edit``."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        edit(ref)
    return ref.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(1000, 2900, (3, 20), generator=torch.Generator().manual_seed(0))


def test_zero_ablation_equals_zeroed_output_projection_columns(mlm):
    d = mlm.d_head
    heads = [(1, 2), (2, 0)]

    def zero_columns(ref):
        for layer, head in heads:
            ref.bert.encoder.layer[layer].attention.output.dense.weight[:, head * d:(head + 1) * d] = 0

    expected = _logits(_eager_with(mlm.model, zero_columns), IDS)
    with attnlab.ablate(mlm, heads, mode="zero"):
        got = _logits(mlm.model, IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _logits(mlm.model, IDS), atol=1e-4)  # the ablation changed something...
    torch.testing.assert_close(_logits(mlm.model, IDS), _logits(_eager_with(mlm.model, lambda r: None), IDS),
                               atol=1e-5, rtol=1e-5)  # ...and leaving the block restored the model


def test_mean_ablation_equals_substituting_the_mean_by_hand(mlm):
    d, (layer, head) = mlm.d_head, (1, 3)
    reference = torch.randint(1000, 2900, (4, 16), generator=torch.Generator().manual_seed(1))
    mean = head_outputs(mlm, reference)[layer][:, :, head].reshape(-1, d).mean(0)  # [d]

    def substitute(ref):
        dense = ref.bert.encoder.layer[layer].attention.output.dense
        dense.bias += dense.weight[:, head * d:(head + 1) * d] @ mean  # the constant input, folded into the bias
        dense.weight[:, head * d:(head + 1) * d] = 0

    expected = _logits(_eager_with(mlm.model, substitute), IDS)
    with attnlab.ablate(mlm, "L1H3", mode="mean", reference=reference):
        got = _logits(mlm.model, IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_resample_patches_the_heads_output_from_another_input(mlm):
    other = torch.randint(1000, 2900, IDS.shape, generator=torch.Generator().manual_seed(2))
    with attnlab.ablate(mlm, [(0, 1)], mode="resample", reference=IDS):  # patching with its own output: no change
        torch.testing.assert_close(_logits(mlm.model, IDS), _logits(mlm.model, IDS), atol=0, rtol=0)
        same = _logits(mlm.model, IDS)
    torch.testing.assert_close(same, _logits(mlm.model, IDS), atol=1e-6, rtol=1e-6)
    with attnlab.ablate(mlm, [(0, 1)], mode="resample", reference=other):
        patched_outputs = head_outputs(mlm, IDS)
    source = head_outputs(mlm, other)
    torch.testing.assert_close(patched_outputs[0][:, :, 1], source[0][:, :, 1])  # that head now says what it said there
    torch.testing.assert_close(patched_outputs[0][:, :, 0], head_outputs(mlm, IDS)[0][:, :, 0])  # others untouched
    with pytest.raises(InputError, match="same batch and length"):
        with attnlab.ablate(mlm, [(0, 1)], mode="resample", reference=other[:, :10]):
            _logits(mlm.model, IDS)


def test_ablation_works_around_the_extractor(mlm):
    plain = attnlab.extract_attention(mlm, IDS, query_positions=torch.full((3, 1), 5)).attention
    with attnlab.ablate(mlm, [(0, 0), (0, 1), (0, 2), (0, 3)], mode="zero"):
        ablated = attnlab.extract_attention(mlm, IDS, query_positions=torch.full((3, 1), 5)).attention
    torch.testing.assert_close(ablated[:, :, 0], plain[:, :, 0])  # layer 0's own attention is upstream of its edit
    assert (ablated[:, :, 1] - plain[:, :, 1]).abs().max() > 1e-6  # later layers see the change (weak: random weights)


def test_scan_with_prefix_reuse_equals_the_naive_scan(mlm):
    task = rrt_task(mlm, trials=5, n=12, seed=3)
    for mode, reference in (("zero", None), ("mean", task.ids_first)):
        fast = scan_rrt(mlm, task, mode=mode, reference=reference, batch_size=2)
        assert len(fast) == mlm.n_layers * mlm.n_heads
        for (layer, head), metrics in fast.items():
            with attnlab.ablate(mlm, [(layer, head)], mode=mode, reference=reference):
                naive = rrt_metrics(mlm, task, batch_size=3)
            for name in ("copying_gain", "ce_second", "top1_second"):
                torch.testing.assert_close(metrics[name], naive[name], atol=1e-5, rtol=1e-5)


def test_rrt_task_masks_the_same_token_in_each_copy(mlm):
    task = rrt_task(mlm, trials=6, n=12, seed=0)
    rows = torch.arange(6)
    assert (task.ids_second[rows, task.pos_second] == 103).all() and (task.ids_first[rows, task.pos_first] == 103).all()
    assert (task.ids_first[rows, task.pos_second] == task.token).all()
    assert (task.ids_second[rows, task.pos_first] == task.token).all()
    assert (task.pos_second - task.pos_first == 12).all()


def test_bad_heads_and_modes_are_refused(mlm):
    with pytest.raises(InputError, match="L9H0 does not exist"):
        parse_heads("L9H0", 3, 4)
    with pytest.raises(InputError, match="write heads as"):
        parse_heads("9:0", 3, 4)
    with pytest.raises(InputError, match="unknown ablation mode"):
        with attnlab.ablate(mlm, "L0H0", mode="noise"):
            pass
    with pytest.raises(InputError, match="needs a reference"):
        with attnlab.ablate(mlm, "L0H0", mode="mean"):
            pass
