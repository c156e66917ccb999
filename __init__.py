"""attnlab: induction heads, in-context learning and query/key geometry in transformers (BERT-style first).

The small public API (the rest is machinery):

- :func:`attnlab.load_model` - load a model of a supported family + tokenizer (Hub id, cache or folder);
  the families are the records of ``attnlab.core.architectures``.
- :func:`attnlab.extract_attention` - attention rows of chosen queries, every layer and head, batched.
- :func:`attnlab.head_weights` - per-head W_Q, W_K, W_V, W_O slices and biases.
- :func:`attnlab.ablate` - a context in which chosen heads are zeroed, mean-ablated or patched.
- :func:`attnlab.run_experiment` - run any experiment record (``attnlab.experiments_available()``) into a folder.

Names are imported on first use, so ``import attnlab`` (and ``attnlab --help``) does not load torch.
"""

from attnlab._version import __version__

_EXPORTS = {
    "LoadedModel": "attnlab.core.models",
    "load_model": "attnlab.core.models",
    "AttentionRows": "attnlab.core.extractor",
    "extract_attention": "attnlab.core.extractor",
    "HeadWeights": "attnlab.core.weights",
    "head_weights": "attnlab.core.weights",
    "ablate": "attnlab.circuits.ablation",
    "Experiment": "attnlab.core.runs",
    "run_experiment": "attnlab.core.runs",
    "experiments_available": "attnlab.core.runs",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
