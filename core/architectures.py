"""One record per architecture family: everything attnlab needs to know about a model's layout.

Like pyvene's type-to-module tables and TransformerLens's weight conversions, the facts of a family live in
one place. Nothing else in attnlab branches on ``model_type``; it asks the record:

    attention_modules(base)   the module each layer's attention call is made with, in call order ``[L]``
                              (ALBERT shares one module across layers: the list repeats it)
    attn_norm(base, l)        what a layer's attention reads from the residual stream: its pre-LN norm, or
                              None for post-LN families (the layer's input hidden state is read as it is)
    qkvo(lm, l)               layer l's per-head W_Q, b_Q, W_K, b_K, W_V, b_V (``[H, d_model, d_head]`` and
                              ``[H, d_head]``), W_O ``[H, d_head, d_model]``, b_O ``[d_model]`` and the scaling
    lm_head(model)            callable final hidden state -> logits, or None when the model has no LM head
    unembed(model)            the LM head's linear read-out ``[d_model, vocab]`` (its nonlinear transform skipped;
                              a factorised head's dense layer and decoder multiplied), or None without a head
    embed_projection(base)    the Linear that maps factorised token embeddings (ALBERT, ELECTRA) to d_model, or None
    stream(base, l)           absolute-position families: how layer l's attention input is made from token and
                              position embeddings (``Stream``: the tables, the LayerNorm, a projection), or None
    mlp_in(base, l)           layer l's MLP input: (the norm it applies to the residual stream after attention,
                              the input Linear) - the first-layer neurons read through these
    final_norm(base)          the norm applied to the last layer's residual before the LM head (pre-LN families), or
                              None (post-LN families: every layer's output is already normed; the logit lens reads it)
    causal / positions        decoder or encoder; "absolute" or "rotary" (q and k are rotated before the dot
                              product: what the extractor records is the rotated q/k)
    rotate(lm, l, q, k, pos)  rotary families: apply layer l's rotation to pre-rotary per-head q/k

Grouped-query attention (Llama, Qwen2, Mistral): W_K and W_V are returned per *query* head (each key/value
head repeated for the query heads that share it), so every head has its own slices, as in TransformerLens.

Adding a family is adding a record here and its tiny config to ``tests/families.py``, which every test of
``tests/test_architectures.py`` runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from attnlab.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class Stream:
    """How a layer's attention input is made from embeddings: ``x = projection(norm(token[t] + position[p +
    offset] + constant))`` - exact at layer 0 of post-LN families (the embedding LayerNorm) and pre-LN ones
    (the layer's own attention norm of the raw stream)."""

    token: torch.Tensor  # [vocab, E]
    position: torch.Tensor  # [positions, E]
    constant: torch.Tensor | None  # [E] added to every token (BERT's token type 0), or None
    norm: torch.nn.Module  # the LayerNorm over E
    projection: torch.nn.Module | None  # E -> d_model (ALBERT, ELECTRA), or None
    offset: int = 0  # position ids start here (RoBERTa)


def _bert_stream(base, layer):
    emb = base.embeddings
    types = getattr(emb, "token_type_embeddings", None)
    projection = getattr(base, "embeddings_project", None) or getattr(getattr(base, "encoder", None),
                                                                      "embedding_hidden_mapping_in", None)
    return Stream(emb.word_embeddings.weight, emb.position_embeddings.weight,
                  types.weight[0] if types is not None else None, emb.LayerNorm, projection,
                  architecture_of(base.config).position_offset(base.config))


def _gpt2_stream(base, layer):
    return Stream(base.wte.weight, base.wpe.weight, None, base.h[layer].ln_1, None)


def _linear_in(module) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear (``[out, in]``) or GPT-2's Conv1D (``[in, out]``) as ``x @ W + b``: ``([in, out], [out])``."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().T, module.bias.detach()
    return module.weight.detach(), module.bias.detach()


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    causal: bool
    positions: str  # "absolute" | "rotary"
    attention_modules: Callable
    attn_norm: Callable
    qkvo: Callable
    lm_head: Callable
    rotate: Callable | None = None
    #: position ids start here (RoBERTa counts from padding_idx + 1): usable positions shrink by it
    position_offset: Callable = lambda config: 0
    #: extra configuration checks (unsupported options of an otherwise supported family)
    check: Callable = lambda config: None
    #: the layer modules of a BERT-style post-LN encoder (``encoder.layer[l]``), for the layer-by-layer
    #: circuits code (head scan, direct logit attribution); None where that code does not apply
    bert_layers: Callable | None = None
    #: the LM head's linear read-out [d_model, vocab] (see the module doc), or None when ``model`` has no head
    unembed: Callable = lambda model: None
    #: factorised embeddings (ALBERT, ELECTRA): the Linear from the embedding size up to d_model; None: none
    embed_projection: Callable = lambda base: None
    #: absolute-position families: (base, layer) -> Stream; None where position enters by rotating q and k
    stream: Callable | None = None
    #: (base, layer) -> (norm module, (W_in [d_model, F], b_in [F])): what the layer's MLP reads
    mlp_in: Callable | None = None
    #: base -> the norm between the last layer and the LM head, or None (post-LN: outputs are normed already)
    final_norm: Callable = lambda base: None
    notes: str = ""
    #: the first transformers release whose implementation of this family routes attention through the
    #: attention-function registry that attnlab hooks, with the attributes the record reads (found by running
    #: tests/test_architectures.py against each release; the package itself requires the highest of them)
    min_transformers: str = "5.0.0"


# ------------------------------------------------------------------------------------------- weight helpers


def _per_head_in(weight_out_in: torch.Tensor, bias: torch.Tensor | None, n_heads: int, d_head: int):
    """nn.Linear ``[H*d, d_model]`` (+ bias ``[H*d]``) -> x @ W layout ``[H, d_model, d]`` and ``[H, d]``."""
    d_model = weight_out_in.shape[1]
    w = weight_out_in.reshape(n_heads, d_head, d_model).transpose(1, 2)
    b = bias.reshape(n_heads, d_head) if bias is not None else weight_out_in.new_zeros(n_heads, d_head)
    return w, b


def _per_head_out(weight_out_in: torch.Tensor, bias: torch.Tensor | None, n_heads: int, d_head: int):
    """Output projection nn.Linear ``[d_model, H*d]`` -> ``[H, d, d_model]`` and its bias ``[d_model]``."""
    d_model = weight_out_in.shape[0]
    w = weight_out_in.T.reshape(n_heads, d_head, d_model)
    return w, bias if bias is not None else weight_out_in.new_zeros(d_model)


def _expand_kv(w: torch.Tensor, b: torch.Tensor, n_heads: int):
    """Key/value slices of grouped-query attention ``[KV, ...]`` -> one per query head ``[H, ...]``
    (query head h reads key/value head h // (H / KV), as ``repeat_kv`` does)."""
    rep = n_heads // w.shape[0]
    return w.repeat_interleave(rep, dim=0), b.repeat_interleave(rep, dim=0)


def _separate(q, k, v, o, n_heads, n_kv, d_head, scaling):
    wq, bq = _per_head_in(q.weight, q.bias, n_heads, d_head)
    wk, bk = _expand_kv(*_per_head_in(k.weight, k.bias, n_kv, d_head), n_heads)
    wv, bv = _expand_kv(*_per_head_in(v.weight, v.bias, n_kv, d_head), n_heads)
    wo, bo = _per_head_out(o.weight, o.bias, n_heads, d_head)
    return wq, bq, wk, bk, wv, bv, wo, bo, scaling


def _scaling(module, d_head):
    return float(getattr(module, "scaling", d_head**-0.5))


def _fused_qkv(weight_out_in: torch.Tensor, bias: torch.Tensor | None, n_heads: int, d_head: int) -> list:
    """One fused projection ``[3*H*d, d_model]`` laid out (q | k | v), each head-major -> the six per-head
    slices of :func:`_per_head_in` (GPT-2's c_attn, transposed from Conv1D; ModernBERT's Wqkv)."""
    width = n_heads * d_head
    parts = []
    for i in range(3):
        part = slice(i * width, (i + 1) * width)
        parts.extend(_per_head_in(weight_out_in[part], None if bias is None else bias[part], n_heads, d_head))
    return parts


def _attention_module(lm, layer: int):
    return lm.arch.attention_modules(lm.base)[layer]


def _linears(q: str, k: str, v: str, o: str):
    """qkvo of a family whose attention module holds four nn.Linear projections with these names."""

    def qkvo(lm, layer):
        m = _attention_module(lm, layer)
        return _separate(getattr(m, q), getattr(m, k), getattr(m, v), getattr(m, o), lm.n_heads, lm.n_kv_heads,
                         lm.d_head, _scaling(m, lm.d_head))

    return qkvo


def _bert_qkvo(lm, layer):
    attention = lm.base.encoder.layer[layer].attention  # .self projects q/k/v, .output.dense is W_O
    own = attention.self
    return _separate(own.query, own.key, own.value, attention.output.dense, lm.n_heads, lm.n_heads, lm.d_head,
                     _scaling(own, lm.d_head))


def _read_out(weight) -> torch.Tensor:
    """An output Linear's weight ``[vocab, d]`` as the ``x @ W_U`` read-out ``[d, vocab]``."""
    return weight.detach().T


def _through(dense, decoder) -> torch.Tensor:
    """A head that first maps d_model down (``dense``: ``[E, d]``) and then to the vocabulary (``decoder``:
    ``[vocab, E]``): its linear part, ``[d, vocab]``."""
    return dense.weight.detach().T @ decoder.weight.detach().T


# ----------------------------------------------------------------------------------------- the families


def _bert_like_check(config):
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise UnsupportedModelError(
            f"{config.model_type} with position_embedding_type={kind!r} adds a relative-position term to the "
            "attention scores that attnlab does not reproduce; only 'absolute' is supported")


BERT_LIKE = Architecture(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    causal=False,
    positions="absolute",
    attention_modules=lambda base: [layer.attention.self for layer in base.encoder.layer],
    attn_norm=lambda base, layer: None,  # post-LN: the attention reads the layer's input as it is
    qkvo=_bert_qkvo,
    lm_head=lambda model: (getattr(model, "cls", None) or getattr(model, "lm_head", None)
                           or _electra_generator_head(model)),
    position_offset=lambda config: (config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert")
                                    else 0),
    check=_bert_like_check,
    bert_layers=lambda base: list(base.encoder.layer),
    unembed=lambda model: (_read_out(model.cls.predictions.decoder.weight) if hasattr(model, "cls") else
                           _read_out(model.lm_head.decoder.weight) if hasattr(model, "lm_head") else
                           _through(model.generator_predictions.dense, model.generator_lm_head)
                           if hasattr(model, "generator_lm_head") else None),
    embed_projection=lambda base: getattr(base, "embeddings_project", None),  # ELECTRA with embedding_size < hidden
    stream=_bert_stream,
    mlp_in=lambda base, layer: (base.encoder.layer[layer].attention.output.LayerNorm,
                                _linear_in(base.encoder.layer[layer].intermediate.dense)),
    notes="BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA (discriminator: no LM head; generator: masked LM)",
)


def _electra_generator_head(model):
    if hasattr(model, "generator_lm_head"):
        return lambda hidden: model.generator_lm_head(model.generator_predictions(hidden))
    return None


DISTILBERT = Architecture(
    family="distilbert",
    model_types=("distilbert",),
    causal=False,
    positions="absolute",
    attention_modules=lambda base: [layer.attention for layer in base.transformer.layer],
    attn_norm=lambda base, layer: None,
    qkvo=_linears("q_lin", "k_lin", "v_lin", "out_lin"),
    lm_head=lambda model: ((lambda h: model.vocab_projector(model.vocab_layer_norm(model.activation(
        model.vocab_transform(h))))) if hasattr(model, "vocab_projector") else None),
    unembed=lambda model: _read_out(model.vocab_projector.weight) if hasattr(model, "vocab_projector") else None,
    stream=_bert_stream,
    mlp_in=lambda base, layer: (base.transformer.layer[layer].sa_layer_norm,
                                _linear_in(base.transformer.layer[layer].ffn.lin1)),
)


def _albert_modules(base):
    cfg = base.config
    groups = base.encoder.albert_layer_groups
    per_group = cfg.num_hidden_layers / cfg.num_hidden_groups
    return [groups[int(i / per_group)].albert_layers[0].attention for i in range(cfg.num_hidden_layers)]


def _albert_layer(base, layer):
    cfg = base.config
    return base.encoder.albert_layer_groups[int(layer / (cfg.num_hidden_layers / cfg.num_hidden_groups))].albert_layers[0]


def _albert_check(config):
    if getattr(config, "inner_group_num", 1) != 1:
        raise UnsupportedModelError(
            f"ALBERT with inner_group_num={config.inner_group_num} runs several attention calls per layer; attnlab "
            "reads ALBERT with inner_group_num=1 (every released ALBERT checkpoint)")


ALBERT = Architecture(
    family="albert",
    model_types=("albert",),
    causal=False,
    positions="absolute",
    attention_modules=_albert_modules,  # shared parameters: the same module repeats across layers
    attn_norm=lambda base, layer: None,
    qkvo=_linears("query", "key", "value", "dense"),
    lm_head=lambda model: getattr(model, "predictions", None),
    unembed=lambda model: (_through(model.predictions.dense, model.predictions.decoder)
                           if hasattr(model, "predictions") else None),
    embed_projection=lambda base: base.encoder.embedding_hidden_mapping_in,
    stream=_bert_stream,
    mlp_in=lambda base, layer: (_albert_modules(base)[layer].LayerNorm,
                                _linear_in(_albert_layer(base, layer).ffn)),
    check=_albert_check,
    notes="layers share parameters (num_hidden_groups groups); layer l's attention is its group's module",
)


def _rotate_with(apply_rotary, needs_layer_type=False):
    """rotate(lm, layer, q, k, positions): q/k ``[B, H, S, d]`` pre-rotary -> rotated, as the model does it."""

    def rotate(lm, layer, q, k, positions):
        base = lm.base
        positions = positions.to(q.device)
        if needs_layer_type:
            cos, sin = base.rotary_emb(q, positions, base.config.layer_types[layer])
        else:
            cos, sin = base.rotary_emb(q, positions)
        return apply_rotary(q, k, cos, sin)

    return rotate


def _modernbert_qkvo(lm, layer):
    m, H, d = _attention_module(lm, layer), lm.n_heads, lm.d_head
    return (*_fused_qkv(m.Wqkv.weight, m.Wqkv.bias, H, d), *_per_head_out(m.Wo.weight, m.Wo.bias, H, d), d**-0.5)


def _modernbert_rotate(q, k, cos, sin):
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)


MODERNBERT = Architecture(
    family="modernbert",
    model_types=("modernbert",),
    causal=False,
    positions="rotary",
    attention_modules=lambda base: [layer.attn for layer in base.layers],
    attn_norm=lambda base, layer: base.layers[layer].attn_norm,  # pre-LN (Identity in layer 0)
    qkvo=_modernbert_qkvo,
    lm_head=lambda model: (lambda h: model.decoder(model.head(h))) if hasattr(model, "decoder") else None,
    unembed=lambda model: _read_out(model.decoder.weight) if hasattr(model, "decoder") else None,
    rotate=_rotate_with(_modernbert_rotate, needs_layer_type=True),
    final_norm=lambda base: base.final_norm,
    notes="rotary positions; local (sliding-window) layers alternate with global ones",
    min_transformers="5.7.0",  # before it ModernBERT calls its own attention functions
)


def _gpt2_qkvo(lm, layer):
    m, H, d = _attention_module(lm, layer), lm.n_heads, lm.d_head
    # Conv1D stores [in, out]: transposed, c_attn is nn.Linear's fused [3*D, D] and c_proj its [D, H*d]
    return (*_fused_qkv(m.c_attn.weight.T, m.c_attn.bias, H, d),
            *_per_head_out(m.c_proj.weight.T, m.c_proj.bias, H, d), float(m.scaling))


GPT2 = Architecture(
    family="gpt2",
    model_types=("gpt2",),
    causal=True,
    positions="absolute",
    attention_modules=lambda base: [block.attn for block in base.h],
    attn_norm=lambda base, layer: base.h[layer].ln_1,
    qkvo=_gpt2_qkvo,
    lm_head=lambda model: getattr(model, "lm_head", None),
    unembed=lambda model: _read_out(model.lm_head.weight) if hasattr(model, "lm_head") else None,
    stream=_gpt2_stream,
    mlp_in=lambda base, layer: (base.h[layer].ln_2, _linear_in(base.h[layer].mlp.c_fc)),
    final_norm=lambda base: base.ln_f,
    min_transformers="5.4.0",  # GPT2Attention.scaling (read by qkvo) arrives in 5.4
)


def _neox_qkvo(lm, layer):
    m, H, d, D = _attention_module(lm, layer), lm.n_heads, lm.d_head, lm.d_model
    # fused [H * 3d, D], interleaved per head: head h's rows are q (d), k (d), v (d)
    w = m.query_key_value.weight.reshape(H, 3, d, D)
    b = m.query_key_value.bias.reshape(H, 3, d) if m.query_key_value.bias is not None else w.new_zeros(H, 3, d)
    parts = []
    for i in range(3):
        parts.extend((w[:, i].transpose(1, 2), b[:, i]))
    return (*parts, *_per_head_out(m.dense.weight, m.dense.bias, H, d), float(m.scaling))


def _neox_rotate(q, k, cos, sin):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


GPT_NEOX = Architecture(
    family="gpt_neox",
    model_types=("gpt_neox",),
    causal=True,
    positions="rotary",
    attention_modules=lambda base: [layer.attention for layer in base.layers],
    attn_norm=lambda base, layer: base.layers[layer].input_layernorm,
    qkvo=_neox_qkvo,
    lm_head=lambda model: getattr(model, "lm_head", None) or getattr(model, "embed_out", None),
    unembed=lambda model: (_read_out((getattr(model, "lm_head", None) or model.embed_out).weight)
                           if hasattr(model, "lm_head") or hasattr(model, "embed_out") else None),
    rotate=_rotate_with(_neox_rotate),
    final_norm=lambda base: base.final_layer_norm,
    notes="the Pythia suite; partial rotary (rotary_pct of each head's dimensions); training checkpoints as revisions",
)


def _llama_rotate(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


LLAMA_LIKE = Architecture(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    causal=True,
    positions="rotary",
    attention_modules=lambda base: [layer.self_attn for layer in base.layers],
    attn_norm=lambda base, layer: base.layers[layer].input_layernorm,
    qkvo=_linears("q_proj", "k_proj", "v_proj", "o_proj"),
    lm_head=lambda model: getattr(model, "lm_head", None),
    unembed=lambda model: _read_out(model.lm_head.weight) if hasattr(model, "lm_head") else None,
    rotate=_rotate_with(_llama_rotate),
    final_norm=lambda base: base.norm,
    notes="rotary positions, grouped-query attention (W_K / W_V repeated per query head), RMSNorm",
)

FAMILIES = (BERT_LIKE, DISTILBERT, ALBERT, MODERNBERT, GPT2, GPT_NEOX, LLAMA_LIKE)
_BY_TYPE = {t: arch for arch in FAMILIES for t in arch.model_types}

#: families that are refused, with the reason
REFUSED = {
    "deberta": "DeBERTa computes disentangled (content x relative-position) attention inside its own modules, outside "
               "the attention-function registry that attnlab reads, so its attention rows cannot be recorded faithfully",
    "deberta-v2": "DeBERTa-v2/v3 computes disentangled (content x relative-position) attention inside its own modules, "
                  "outside the attention-function registry that attnlab reads, so its attention rows cannot be "
                  "recorded faithfully",
}

SUPPORTED_MODEL_TYPES = tuple(_BY_TYPE)


def architecture_of(config) -> Architecture:
    """The record for a config's ``model_type``; :class:`UnsupportedModelError` (saying why) otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: {REFUSED[model_type]}")
    arch = _BY_TYPE.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; attnlab reads attention from: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    _check_transformers(arch)
    arch.check(config)
    return arch


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


def _check_transformers(arch: Architecture) -> None:
    from packaging.version import Version

    found = Version(installed_transformers())
    if found < Version(arch.min_transformers):
        raise UnsupportedModelError(
            f"the {arch.family} family needs transformers >= {arch.min_transformers} (found {found}): earlier releases "
            f"do not route its attention through the attention-function registry that attnlab reads; "
            f"pip install -U 'transformers>={arch.min_transformers}'")
