"""One tiny random model per supported architecture family, built from its config class (no download)."""

import torch

VOCAB = 120
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs():
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)
    return {
        "bert": (T.BertConfig(**common, max_position_embeddings=64), T.BertForMaskedLM),
        "roberta": (T.RobertaConfig(**common, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                    eos_token_id=2), T.RobertaForMaskedLM),
        "xlm-roberta": (T.XLMRobertaConfig(**common, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                           eos_token_id=2), T.XLMRobertaForMaskedLM),
        "electra": (T.ElectraConfig(**common, embedding_size=16, max_position_embeddings=64), T.ElectraForMaskedLM),
        "distilbert": (T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=48,
                                          max_position_embeddings=64, pad_token_id=0), T.DistilBertForMaskedLM),
        "albert": (T.AlbertConfig(**common, embedding_size=16, max_position_embeddings=64, num_hidden_groups=1,
                                  pad_token_id=0), T.AlbertForMaskedLM),
        "modernbert": (T.ModernBertConfig(**common, max_position_embeddings=64, local_attention=8,
                                          global_attn_every_n_layers=2, cls_token_id=1, sep_token_id=2,
                                          mask_token_id=3, **SPECIAL), T.ModernBertForMaskedLM),
        "gpt2": (T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1,
                              eos_token_id=2), T.GPT2LMHeadModel),
        "gpt_neox": (T.GPTNeoXConfig(**common, max_position_embeddings=64, rotary_pct=0.25, **SPECIAL),
                     T.GPTNeoXForCausalLM),
        "llama": (T.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=64, **SPECIAL),
                  T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=64, **SPECIAL),
                  T.Qwen2ForCausalLM),
        "mistral": (T.MistralConfig(**common, num_key_value_heads=1, max_position_embeddings=64, sliding_window=None,
                                    **SPECIAL), T.MistralForCausalLM),
    }


FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "modernbert", "gpt2", "gpt_neox",
            "llama", "qwen2", "mistral")


def tiny_family(name: str, seed: int = 0):
    """A tiny random model of ``name``'s family with its LM head, eval mode; biases made non-zero so that
    a missed bias would show."""
    cfg, cls = _configs()[name]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and "norm" not in pname.lower():
                p.normal_(0, 0.2)
    return model
