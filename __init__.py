"""attnlab: induction heads, in-context learning and query/key geometry in transformers (BERT-style first).

The small public API (the rest is machinery):

- :func:`attnlab.load_model` - load a model of a supported family + tokenizer (Hub id, cache or folder);
  the families are the records of ``attnlab.core.architectures``.
- :func:`attnlab.extract_attention` - attention rows of chosen queries, every layer and head, batched.
- :func:`attnlab.head_weights` - per-head W_Q, W_K, W_V, W_O slices and biases.
- :func:`attnlab.ablate` - a context in which chosen heads are zeroed, mean-ablated or patched.
"""

from attnlab.core.models import LoadedModel, load_model
from attnlab.core.extractor import AttentionRows, extract_attention
from attnlab.core.weights import HeadWeights, head_weights
from attnlab.circuits.ablation import ablate

__all__ = [
    "LoadedModel",
    "load_model",
    "AttentionRows",
    "extract_attention",
    "HeadWeights",
    "head_weights",
    "ablate",
]
__version__ = "0.1.0"
