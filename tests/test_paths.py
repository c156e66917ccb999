"""Path patching of queries and keys (``attnlab.circuits.paths``): equal to a slow, obvious reference built from
Hugging Face eager attention and forward hooks, and naming the feeder planted in a known circuit."""

import copy

import numpy as np
import pytest
import torch
from attnlab.circuits.paths import FEEDER_RULE, induction_paths_input, trace_paths
from attnlab.circuits.tasks import rrt_task
from attnlab.core.errors import InputError
from attnlab.core.models import wrap_model
from conftest import tiny_bert
from families import tiny_family


def _eager(model, edit=None):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    if edit:
        with torch.no_grad():
            edit(ref)
    return ref.eval()


def _loud(model, std: float = 0.3):
    """Attention and embedding weights large enough that one head changes another's pattern by several percent
    (initialised at 0.02, a patch changes attention by about 1e-6: no test of anything)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("attention" in name or "embed" in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _reference(model, ids, queries, targets, layers, *, projection, splice, out_proj, zeroed_heads=lambda sh: [sh]):
    """``{(sender, layer, path): [T, H]}``: each receiver layer's attention to the targets (mean over queries) with
    that layer's queries or keys taken from a run in which the sender (``zeroed_heads(head)`` of its layer; head
    None: the whole layer) is zeroed, and ``{layer: [T, H]}`` clean - by editing weights and hooking the projection
    modules in eager attention, nothing of attnlab's hook point involved."""
    clean = _eager(model)

    def attention_to_targets(hooks, layer):
        handles = [projection(clean, at, path).register_forward_hook(fn) for at, path, fn in hooks]
        with torch.no_grad():
            att = clean(input_ids=ids, output_attentions=True).attentions[layer]  # [T, H, S, S]
        for h in handles:
            h.remove()
        rows = att[torch.arange(len(ids))[:, None], :, queries]  # [T, Q, H, S]
        return rows.gather(-1, targets[:, :, None, None].expand(-1, -1, rows.shape[2], 1))[..., 0].mean(1)

    out = {}
    heads = model.config.num_attention_heads
    for sl in range(max(layers)):
        for sh, zeroed in [(sh, zeroed_heads(sh)) for sh in range(heads)] + [(None, range(heads))]:
            def zero_sender(m):
                dense = out_proj(m, sl)
                d = dense.weight.shape[1] // heads
                for h in zeroed:
                    dense.weight[:, h * d:(h + 1) * d] = 0

            ablated, kept = _eager(model, zero_sender), {}
            later = [layer for layer in layers if layer > sl]
            handles = [projection(ablated, layer, path).register_forward_hook(
                lambda m, i, o, key=(layer, path): kept.setdefault(key, o)) for layer in later for path in "KQ"]
            with torch.no_grad():
                ablated(input_ids=ids)
            for h in handles:
                h.remove()
            for layer in later:
                for path in "KQ":
                    fn = lambda m, i, o, other=kept[(layer, path)], p=path: splice(o, other, p)  # noqa: E731
                    out[((sl, sh), layer, path)] = attention_to_targets([(layer, path, fn)], layer)
    return out, {layer: attention_to_targets([], layer) for layer in layers}


def test_path_patching_equals_eager_hooks_in_bert_through_a_layer_between():
    model = _loud(tiny_bert(masked_lm=True, vocab_size=120, layers=3, heads=4, hidden=32, positions=128))
    lm = wrap_model(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (5, 24), generator=g)
    queries = torch.randint(12, 24, (5, 3), generator=g)
    targets = torch.randint(0, 12, (5, 3), generator=g)
    result = trace_paths(lm, ids, queries, targets, [(2, 1), (2, 3), (1, 0)])
    kw = dict(projection=lambda m, layer, path: getattr(m.bert.encoder.layer[layer].attention.self,
                                                        "key" if path == "K" else "query"),
              splice=lambda out, other, path: other, out_proj=lambda m, layer: m.bert.encoder.layer[layer].attention.output.dense)
    ref, clean = _reference(model, ids, queries, targets, [1, 2], **kw)
    alone, _ = _reference(model, ids, queries, targets, [1, 2],
                          zeroed_heads=lambda sh: [h for h in range(4) if h != sh], **kw)
    for r, (rl, rh) in enumerate(result.receivers):
        for sender in [(sl, sh) for sl in range(rl) for sh in range(4)]:
            for path in ("K", "Q"):
                got = result.patched[path][r, sender[0], sender[1]]
                assert np.allclose(got, ref[(sender, rl, path)][:, rh].double().numpy(), atol=2e-6), (rl, rh, sender)
                got = result.alone[path][r, sender[0], sender[1]]
                assert np.allclose(got, alone[(sender, rl, path)][:, rh].double().numpy(), atol=2e-6), (rl, rh, sender)
        for sl in range(rl):
            for path in ("K", "Q"):
                assert np.allclose(result.floor[path][r, sl], ref[((sl, None), rl, path)][:, rh].double().numpy(),
                                   atol=2e-6), (rl, rh, sl)
        assert np.allclose(result.clean[r], clean[rl][:, rh].double().numpy(), atol=2e-6)
    for path in ("K", "Q"):  # the patches matter, so the equality above says something
        assert np.nanmax(np.abs(result.patched[path] - result.clean[:, None, None])) > 0.02
        assert np.nanmax(np.abs(result.alone[path] - result.patched[path])) > 0.02
    assert np.isnan(result.patched["K"][0, 1]).all() and np.isnan(result.patched["K"][0, 2]).all()  # L1 receiver


def test_path_patching_equals_eager_hooks_in_rotary_gpt_neox():
    """Keys swapped before the rotation (in the fused projection) give what keys swapped after it give: a rotary
    position depends on the position only, and both runs have the same positions."""
    model = _loud(tiny_family("gpt_neox"))
    lm = wrap_model(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (4, 30), generator=g)
    queries = torch.arange(15, 30).expand(4, -1)
    targets = queries - torch.randint(1, 14, (4, 15), generator=g)

    def splice(out, other, path):
        d = model.config.hidden_size // model.config.num_attention_heads
        part = slice(d, 2 * d) if path == "K" else slice(0, d)
        shaped, kept = out.view(*out.shape[:2], -1, 3 * d).clone(), other.view(*other.shape[:2], -1, 3 * d)
        shaped[..., part] = kept[..., part]
        return shaped.view(out.shape)

    kw = dict(projection=lambda m, layer, path: m.gpt_neox.layers[layer].attention.query_key_value, splice=splice,
              out_proj=lambda m, layer: m.gpt_neox.layers[layer].attention.dense)
    result = trace_paths(lm, ids, queries, targets, [(2, 0), (2, 2)])
    ref, clean = _reference(model, ids, queries, targets, [2], **kw)
    for r, (rl, rh) in enumerate(result.receivers):
        assert np.allclose(result.clean[r], clean[rl][:, rh].double().numpy(), atol=2e-6)
        for sender in [(sl, sh) for sl in range(rl) for sh in range(4)]:
            for path in ("K", "Q"):
                got = result.patched[path][r, sender[0], sender[1]]
                assert np.allclose(got, ref[(sender, rl, path)][:, rh].double().numpy(), atol=2e-6), (rl, rh, sender)
    for path in ("K", "Q"):
        assert np.nanmax(np.abs(result.patched[path] - result.clean[:, None, None])) > 0.03


def _planted_input(lm, trials=16, n=25):
    from attnlab.induction.protocols import make_protocol, token_spec_for
    from attnlab.induction.variants import build_batch, get_variant

    protocol = make_protocol("clean", token_spec_for(lm))
    batch = build_batch(get_variant("standard"), protocol, trials, n, 0, max_positions=lm.max_positions)
    return batch, induction_paths_input(batch, lm.is_causal)


def test_path_patching_names_the_planted_previous_token_head_on_both_paths():
    """The planted circuit's induction head matches the previous token of query and key alike: its previous-token
    head feeds both paths, and the idle head neither."""
    from planted import planted_induction_circuit

    lm = wrap_model(planted_induction_circuit())
    batch, inputs = _planted_input(lm)
    assert (batch.input_ids[torch.arange(16), inputs[2][:, 0]] == batch.masked_token).all()  # the previous instance
    result = trace_paths(lm, *inputs, [(1, 0), (1, 1)])
    assert result.clean[0].mean() > 0.99  # L1H0 attends to the previous instance
    for path in ("K", "Q"):
        lost = result.lost(path)
        assert lost[0, 0, 0] > 0.99 and abs(lost[0, 0, 1]) < 1e-3  # into L1H0: L0H0 carries it all, L0H1 nothing
    rows = result.table(seed=0)
    named = {(r["receiver"], r["sender"], r["path"]) for r in rows if r["named"]}
    assert named == {("L1H0", "L0H0", "K"), ("L1H0", "L0H0", "Q")}, FEEDER_RULE
    lo = [r["ci_low"] for r in rows if (r["receiver"], r["sender"]) == ("L1H0", "L0H0")]
    assert min(lo) > 0.99
    # alone in its layer, the previous-token head restores it all and the idle head nothing
    assert {r["named_by"] for r in rows if r["named"]} == {"necessary+sufficient"}
    assert all(r["restored"] < 0.01 for r in rows if (r["receiver"], r["sender"]) == ("L1H0", "L0H1"))
    idle = [r for r in rows if r["receiver"] == "L1H1"]  # layer 0 carries nothing of the idle head's pattern: no
    assert idle and all(abs(r["layer_lost"]) < 0.01 and np.isnan(r["restored"]) and np.isnan(r["restored_ci_low"])
                        for r in idle)  # share of it (a ratio over ~0 would bootstrap to 1e299)


def test_path_patching_names_previous_token_heads_that_back_each_other_up():
    """Two identical previous-token heads: ablating either one removes nothing (the necessity test names neither),
    ablating both removes it all, and each alone restores it all - both named, as sufficient."""
    from attnlab.circuits.heads import feeders
    from planted import planted_induction_circuit

    lm = wrap_model(planted_induction_circuit(backup=True))
    _, inputs = _planted_input(lm)
    result = trace_paths(lm, *inputs, [(1, 0)])
    assert result.clean[0].mean() > 0.99
    for path in ("K", "Q"):
        assert np.abs(result.lost(path)[0, 0]).max() < 0.01  # neither is needed
        assert result.layer_lost(path)[0, 0] > 0.99  # the two together are
        assert (result.restored(path)[0, 0] > 0.99).all()
    rows = result.table(seed=0)
    assert {(r["sender"], r["path"], r["named_by"]) for r in rows} == {
        (s, p, "sufficient") for s in ("L0H0", "L0H1") for p in ("K", "Q")}, FEEDER_RULE
    entry = feeders(rows)["L1H0"]["K"]
    assert entry["named"] == ["L0H0", "L0H1"] and entry["most_sufficient"]["restored"] > 0.99


def test_causal_targets_are_the_token_after_the_previous_instance():
    lm = wrap_model(tiny_family("gpt_neox"))
    batch, (ids, queries, targets) = _planted_input(lm, trials=6, n=10)
    assert queries.shape == targets.shape == (6, 1)
    for t in range(6):
        q, k = int(queries[t, 0]), int(targets[t, 0])
        assert ids[t, k - 1] == ids[t, q] and k < q  # the key's previous token is the query's token


def test_path_patching_refuses_a_receiver_in_the_first_layer():
    lm = wrap_model(tiny_bert(masked_lm=True, vocab_size=30522, layers=2, heads=2, hidden=16, positions=64))
    with pytest.raises(InputError, match="layers 1"):
        trace_paths(lm, torch.ones(2, 8, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                    torch.zeros(2, 1, dtype=torch.long), [(0, 1)])


@pytest.fixture
def cheap_composition(monkeypatch):
    """The weight-based composition's chance level to 256 samples (at full precision it costs up to a minute at
    d_model 256); path patching is what these tests are about."""
    from functools import partial

    import attnlab.circuits.heads as heads

    monkeypatch.setattr(heads, "composition_scores", partial(heads.composition_scores, max_samples=256))


def test_heads_traces_the_paths_into_the_planted_induction_head(tmp_path, cheap_composition):
    import csv

    from attnlab.circuits.experiment import HEADS, HeadsConfig, describe_heads
    from attnlab.core.runs import run_experiment
    from planted import planted_induction_circuit

    lm = wrap_model(planted_induction_circuit())
    meta = run_experiment(HEADS, HeadsConfig(model="planted", trials=16, seq_len=25, ablation=False), tmp_path, lm=lm)
    assert meta["feeders"]["L1H0"]["K"]["named"] == ["L0H0"] and meta["feeders"]["L1H0"]["Q"]["named"] == ["L0H0"]
    assert "L1H1" not in meta["feeders"]  # its induction score is at chance: not a receiver
    rows = list(csv.DictReader(open(tmp_path / "paths.csv")))
    assert len(rows) == 4 and {r["named"] for r in rows} == {"1", "0"}
    assert meta["figures"]["paths"] == "paths.png" and (tmp_path / "paths.png").stat().st_size > 10_000
    assert any(line.startswith("K path into L1H0: L0H0 (strongest L0H0 removes 99.9%") for line in describe_heads(meta))


def test_heads_traces_no_path_without_an_induction_like_head(tmp_path, cheap_composition):
    from attnlab.circuits.experiment import HEADS, HeadsConfig
    from attnlab.core.runs import run_experiment

    lm = wrap_model(tiny_bert(masked_lm=True, vocab_size=30522, layers=2, heads=2, hidden=16, positions=64))
    meta = run_experiment(HEADS, HeadsConfig(model="random", trials=4, seq_len=10, detector_trials=1,
                                             ablation=False), tmp_path, lm=lm)
    assert meta["feeders"] == {} and not (tmp_path / "paths.csv").exists() and "paths" not in meta["figures"]
    assert any(n.startswith("paths: no head past layer 0 has a induction_at_mask score") for n in meta["notes"])
