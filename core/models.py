"""Load a model the normal way (Hub id, HF cache or local folder), in one place.

Supported architectures: one record per family in ``core.architectures`` (BERT, RoBERTa/XLM-R, ELECTRA,
DistilBERT, ALBERT, ModernBERT, GPT-2, GPT-NeoX/Pythia, Llama/Qwen2/Mistral); DeBERTa is refused with the reason.
Loading never uses ``trust_remote_code`` and prefers safetensors. The masked-LM head is loaded only when
asked for, and asking for it on a checkpoint that does not contain it is an error rather than the silent
random initialisation transformers would otherwise do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnlab.core.architectures import SUPPORTED_MODEL_TYPES, Architecture, architecture_of  # noqa: F401
from attnlab.core.attention_impl import CAPTURE_IMPLEMENTATION, install_capture_attention
from attnlab.core.errors import InputError, MissingHeadError, ModelNotAvailableError
from attnlab.core.names import (  # noqa: F401
    EMBEDDED_NAME,
    device_map_of,
    embedded_model_path,
    is_embedded,
    model_label,
)
from attnlab.core.provenance import model_fingerprint, parameters_fingerprint

DEVICE_MAPS = ("auto", "balanced", "sequential")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) means CUDA when available, else CPU; anything else must exist here."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map_of(device):
        raise InputError(f"device {device!r} is a device map: pass it to load_model (or --device-map), which lets "
                         "accelerate place the model; it cannot hold a single tensor")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(device)!r} is not supported; attnlab runs on cpu or cuda (or auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} was requested but PyTorch sees no GPU; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "GPU(s); use cuda:0 .. or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


@dataclass
class LoadedModel:
    """A model ready for the extractor, with what experiments need to know about it.

    ``model`` is the module that was loaded (the LM-head model when ``masked_lm=True``); ``base`` is
    its transformer body (BertModel / GPT2Model / LlamaModel ...), which is what the extractor runs; ``arch``
    is its family's record (``core.architectures``).
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
    def arch(self) -> Architecture:
        return architecture_of(self.config)

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
    def n_kv_heads(self) -> int:
        """Key/value heads (fewer than ``n_heads`` under grouped-query attention)."""
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def max_positions(self) -> int:
        """Tokens a sequence may have (RoBERTa's positions start after the padding index)."""
        return self.config.max_position_embeddings - self.arch.position_offset(self.config)

    def lm_head(self):
        """Callable final hidden state ``[..., d_model]`` -> logits ``[..., vocab]``, or None without a head."""
        return self.arch.lm_head(self.model)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def is_causal(self) -> bool:
        return self.arch.causal

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """Digest of what this model is: its files when loaded from disk or the Hub, else its parameters."""
        if not self.meta.get("fingerprint"):
            self.meta["fingerprint"] = parameters_fingerprint(self.model)
        return self.meta["fingerprint"]

    @property
    def label(self) -> str:
        """A short name for titles: a Hub id as it is, a local folder by its name (never an absolute path)."""
        return model_label(self.name)


def model_identity(name: str, revision: str | None = None, lm: "LoadedModel | None" = None) -> str | None:
    """The model part of a reuse key: from the loaded model when there is one, else from ``name`` on disk."""
    if isinstance(lm, LoadedModel):
        return lm.fingerprint
    return model_fingerprint(name, revision)


def check_supported(config) -> Architecture:
    """The config's architecture record; :class:`UnsupportedModelError` saying why when there is none."""
    return architecture_of(config)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


_HUB_REACHABLE: dict = {}
PROBE_SECONDS = 3.0


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers, decided once per process (one short TCP probe of
    ``HF_ENDPOINT``, at most ``PROBE_SECONDS``); ``HF_HUB_OFFLINE=1`` answers no without probing.

    When it does not, every load uses the local cache only (``local_files_only``): no retries."""
    if _offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _HUB_REACHABLE:
        import socket
        import threading
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
        result = [False]

        def probe():  # in a thread: name resolution has no timeout of its own
            try:
                with socket.create_connection((host, port), timeout=PROBE_SECONDS):
                    result[0] = True
            except OSError:
                pass

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(PROBE_SECONDS)
        _HUB_REACHABLE[endpoint] = result[0]
    return _HUB_REACHABLE[endpoint]


def _hub_kwargs(name: str) -> dict:
    """``local_files_only`` for Hub ids when the Hub cannot be reached (folders never touch the network)."""
    return {} if Path(name).expanduser().exists() or hub_reachable() else {"local_files_only": True}


SUPPLY_WEIGHTS_ADVICE = (
    "To run without the Hub, either (1) pass a local folder instead of the id (--model /path/to/folder, made with "
    "save_pretrained() or `hf download ID --local-dir DIR` on a machine with internet), or (2) pre-fill the "
    "Hugging Face cache there with `hf download ID` and copy it here (set HF_HOME to it)."
)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _not_available(name: str, cause: Exception) -> ModelNotAvailableError:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            return ModelNotAvailableError(
                f"model folder '{name}' has no config.json; pass a folder written by save_pretrained() "
                "(config.json + model.safetensors)")
        return ModelNotAvailableError(
            f"could not load model from local folder '{name}': {_first_line(cause)}; the folder needs config.json "
            "and weights that match it (model.safetensors preferred, or pytorch_model.bin), as written by "
            "save_pretrained() - a truncated or mismatched weights file must be saved again")
    if path.exists():
        return ModelNotAvailableError(f"model path '{name}' is a file, not a folder; pass the folder that holds "
                                      "config.json and the weights, or a Hub id")
    if name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        # cannot be a Hub id (those are NAME or OWNER/NAME): the user meant a folder that is not there
        return ModelNotAvailableError(
            f"model folder '{name}' does not exist; pass an existing folder written by save_pretrained() "
            "(config.json + model.safetensors) or a Hub id such as bert-base-uncased"
        )
    why = "HF_HUB_OFFLINE is set" if _offline() else (
        "the Hugging Face Hub cannot be reached from this machine" if not hub_reachable()
        else f"the Hub did not provide it ({_first_line(cause)})")
    folder_note = f" (no folder '{name}' exists here either)" if "/" in name else ""
    err = ModelNotAvailableError(
        f"model '{name}' is not available: not in the local Hugging Face cache and {why}{folder_note}")
    err.advice = SUPPLY_WEIGHTS_ADVICE
    err.short = f"{name} is not in the local Hugging Face cache and {why}"
    return err


def load_config(name_or_path: str, revision: str | None = None):
    from transformers import AutoConfig

    check_revision(name_or_path, revision)
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False,
                                          **_hub_kwargs(name_or_path))
    except (OSError, ValueError, KeyError) as exc:
        raise _not_available(name_or_path, exc) from None


def check_revision(name_or_path: str, revision: str | None) -> None:
    if revision and Path(name_or_path).expanduser().exists():
        raise InputError(f"revision {revision!r} applies to Hub ids only, but '{name_or_path}' is a local folder; "
                         "drop the revision (the folder holds exactly one version)")


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
        device: ``"auto"``, ``"cpu"``, ``"cuda"``..., or ``"map:auto"`` (also ``map:balanced``,
            ``map:sequential``): accelerate's ``device_map``, for models larger than one GPU; the extractor
            feeds the inputs to the embeddings' device and gathers the rows on ``out_device`` as usual.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
    """
    import transformers

    config = load_config(name_or_path, revision)
    arch = check_supported(config)
    if masked_lm:
        cls = transformers.AutoModelForCausalLM if arch.causal else transformers.AutoModelForMaskedLM
    else:
        cls = transformers.AutoModel
    device_map = device_map_of(device)
    if device_map:
        if device_map not in DEVICE_MAPS:
            raise InputError(f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise InputError("a device map (device_map / --device-map) spreads a model over several devices with "
                             "accelerate, which is not installed; pip install 'attnlab[scale]'") from None
        torch_device = None
    else:
        torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    install_capture_attention()
    try:
        model, info = cls.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=torch_dtype,
            **({"device_map": device_map} if device_map else {}),
            attn_implementation=CAPTURE_IMPLEMENTATION,
            trust_remote_code=False,
            output_loading_info=True,
            **_hub_kwargs(name_or_path),
        )
    except Exception as exc:  # truncated or mismatched weights raise many types deep in the loaders
        raise _not_available(name_or_path, exc) from None
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise ModelNotAvailableError(
            f"weights of '{name_or_path}' do not match its config.json ({len(mismatched)} tensors have other "
            f"shapes, e.g. {mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]}); save the "
            "model again with save_pretrained()")
    if masked_lm:
        missing = _missing_head_keys(model, info.get("missing_keys", []))
        if missing:
            raise MissingHeadError(
                f"model '{name_or_path}' has no {'LM' if arch.causal else 'masked-LM'} head "
                f"(missing: {', '.join(sorted(missing)[:3])}...); this experiment needs one. Use a checkpoint "
                "trained with its head, e.g. bert-base-uncased rather than a sentence-embedding encoder."
            )
    if device_map is None:
        model.to(torch_device)
    model.eval()
    tok = load_tokenizer(name_or_path, revision) if tokenizer else None
    source = str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path
    meta = {
        "name": name_or_path,
        "source": source,
        "revision": revision or getattr(config, "_commit_hash", None),
        "model_type": config.model_type,
        "masked_lm": masked_lm,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": str(torch_device) if device_map is None else f"map:{device_map}",
        "fingerprint": model_fingerprint(name_or_path, revision),
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "parameters": parameter_count(model),
    }
    return LoadedModel(model, tok, name_or_path, source, masked_lm, meta)


def parameter_count(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _missing_head_keys(model, missing_keys) -> list[str]:
    """Missing parameters outside the transformer body, except output weights tied to the input embeddings
    (legitimately absent from checkpoints): a head that would be initialised at random."""
    prefix = getattr(model, "base_model_prefix", "")
    embedding = model.get_input_embeddings().weight
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if p is embedding}
    return [k for k in missing_keys if not (prefix and k.startswith(prefix + ".")) and k not in tied]


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
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=False,
                                             **_hub_kwargs(name_or_path))
    except Exception as exc:  # broken tokenizer files raise many types
        raise _not_available(name_or_path, exc) from None


def wrap_model(model: torch.nn.Module, tokenizer=None, name: str = "in-process") -> LoadedModel:
    """Wrap a model built in-process (e.g. ``BertForMaskedLM(BertConfig(...))``) for the extractor.

    Switches the model to the capture attention implementation (SDPA underneath) and eval mode.
    """
    arch = check_supported(model.config)
    install_capture_attention()
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    model.eval()
    has_head = arch.lm_head(model) is not None
    meta = {"name": name, "source": name, "model_type": model.config.model_type, "masked_lm": has_head,
            "layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads,
            "parameters": parameter_count(model)}
    return LoadedModel(model, tokenizer, name, name, has_head, meta)


def as_loaded(model_or_loaded) -> LoadedModel:
    return model_or_loaded if isinstance(model_or_loaded, LoadedModel) else wrap_model(model_or_loaded)
