"""Load a model the normal way (Hub id, HF cache or local folder), in one place.

Supported architectures: the BERT family (``model_type == "bert"``: encoder or masked-LM) and GPT-2.
Loading never uses ``trust_remote_code`` and prefers safetensors. The masked-LM head is loaded only when
asked for, and asking for it on a checkpoint that does not contain it is an error rather than the silent
random initialisation transformers would otherwise do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnlab.core.attention_impl import CAPTURE_IMPLEMENTATION, install_capture_attention
from attnlab.core.errors import MissingHeadError, ModelNotAvailableError, UnsupportedModelError

#: model_type -> (base class name, LM-head class name, prefix of the head's parameters)
_ARCHITECTURES = {
    "bert": ("BertModel", "BertForMaskedLM", "cls."),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel", "lm_head."),
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) means CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotAvailableError(
            "device 'cuda' was requested but PyTorch sees no GPU; use --device cpu (or auto)"
        )
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


@dataclass
class LoadedModel:
    """A model ready for the extractor, with what experiments need to know about it.

    ``model`` is the module that was loaded (the LM-head model when ``masked_lm=True``); ``base`` is
    its transformer body (BertModel / GPT2Model), which is what the extractor runs.
    """

    model: torch.nn.Module
    tokenizer: object | None
    name: str
    source: str
    has_lm_head: bool
    meta: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def base(self) -> torch.nn.Module:
        prefix = getattr(self.model, "base_model_prefix", "")
        return getattr(self.model, prefix, self.model) if prefix else self.model

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_head(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def is_causal(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; attnlab reads attention from "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models (BERT family and GPT-2)"
        )
    if model_type == "bert" and getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"BERT with position_embedding_type={config.position_embedding_type!r} adds a relative-position "
            "term to the attention scores that attnlab does not reproduce; only 'absolute' is supported"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _not_available(name: str, cause: Exception) -> ModelNotAvailableError:
    if Path(name).expanduser().exists():
        return ModelNotAvailableError(
            f"could not load model from local folder '{name}': {cause}. The folder needs config.json and "
            "weights (model.safetensors preferred, or pytorch_model.bin), as written by save_pretrained()."
        )
    if name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        # cannot be a Hub id (those are NAME or OWNER/NAME): the user meant a folder that is not there
        return ModelNotAvailableError(
            f"model folder '{name}' does not exist; pass an existing folder written by save_pretrained() "
            "(config.json + model.safetensors) or a Hub id such as bert-base-uncased"
        )
    why = (
        "HF_HUB_OFFLINE is set"
        if _offline()
        else "the machine looks offline (the Hugging Face Hub could not be reached)"
    )
    return ModelNotAvailableError(
        f"weights for model '{name}' were not found: it is not in the local Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and {why}. To supply them either "
        f"(1) pass a local folder instead of the id (--model /path/to/{name.split('/')[-1]}), created with "
        f"save_pretrained() or `hf download {name} --local-dir DIR` on a machine with internet; or "
        f"(2) pre-fill the cache there with `hf download {name}` and copy the cache folder here (set HF_HOME "
        f"to it). If '{name}' is a typo, check the id on huggingface.co. (cause: {type(cause).__name__}: "
        f"{str(cause).splitlines()[0] if str(cause) else ''})"
    )


def load_config(name_or_path: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _not_available(name_or_path, exc) from exc


def load_model(
    name_or_path: str,
    *,
    masked_lm: bool = False,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "float32",
    revision: str | None = None,
    tokenizer: bool = True,
) -> LoadedModel:
    """Load a supported model and (optionally) its tokenizer, ready for :func:`extract_attention`.

    Args:
        name_or_path: Hub id (``bert-base-uncased``, ``prajjwal1/bert-tiny``, ``gpt2``, ...) or a local
            folder. The HF cache is used and ``HF_HUB_OFFLINE=1`` is honoured.
        masked_lm: load the masked-LM head (BERT) / LM head (GPT-2). Raises :class:`MissingHeadError` when
            the checkpoint has no such head instead of initialising one at random.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
    """
    import transformers

    config = load_config(name_or_path, revision)
    check_supported(config)
    base_name, head_name, head_prefix = _ARCHITECTURES[config.model_type]
    cls = getattr(transformers, head_name if masked_lm else base_name)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    install_capture_attention()
    try:
        model, info = cls.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=torch_dtype,
            attn_implementation=CAPTURE_IMPLEMENTATION,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError) as exc:
        raise _not_available(name_or_path, exc) from exc
    if masked_lm:
        missing = [k for k in info.get("missing_keys", []) if k.startswith(head_prefix)]
        # Tied decoder weights are legitimately absent from checkpoints; anything else in the head is not.
        missing = [k for k in missing if not k.endswith(("decoder.weight", "lm_head.weight"))]
        if missing:
            raise MissingHeadError(
                f"model '{name_or_path}' has no {'masked-LM' if config.model_type == 'bert' else 'LM'} head "
                f"(missing: {', '.join(sorted(missing)[:3])}...); this experiment needs one. Use a checkpoint "
                "trained with its head, e.g. bert-base-uncased rather than a sentence-embedding encoder."
            )
    model.to(torch_device).eval()
    tok = load_tokenizer(name_or_path, revision) if tokenizer else None
    source = str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path
    meta = {
        "name": name_or_path,
        "source": source,
        "revision": revision or getattr(config, "_commit_hash", None),
        "model_type": config.model_type,
        "masked_lm": masked_lm,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": str(torch_device),
    }
    return LoadedModel(model, tok, name_or_path, source, masked_lm, meta)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The model's tokenizer; None for a local folder that holds no tokenizer files.

    (transformers would otherwise build an empty tokenizer for such a folder.) Experiments then fall back
    to bert-base-uncased's id layout.
    """
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        return None

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _not_available(name_or_path, exc) from exc


def wrap_model(model: torch.nn.Module, tokenizer=None, name: str = "in-process") -> LoadedModel:
    """Wrap a model built in-process (e.g. ``BertForMaskedLM(BertConfig(...))``) for the extractor.

    Switches the model to the capture attention implementation (SDPA underneath) and eval mode.
    """
    check_supported(model.config)
    install_capture_attention()
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    model.eval()
    has_head = type(model).__name__ in {"BertForMaskedLM", "GPT2LMHeadModel"}
    meta = {"name": name, "source": name, "model_type": model.config.model_type, "masked_lm": has_head}
    return LoadedModel(model, tokenizer, name, name, has_head, meta)


def as_loaded(model_or_loaded) -> LoadedModel:
    return model_or_loaded if isinstance(model_or_loaded, LoadedModel) else wrap_model(model_or_loaded)
