"""In-context learning score (the paper's Figure 5): loss with 50 tokens of context minus loss with 500.

The experiment's record is ``attnlab.icl.experiment.ICL``; names below are imported on first use."""

from attnlab.core.lazy import lazy_exports

_EXPORTS = {name: "attnlab.icl.score" for name in (
    "ICL_PROTOCOLS", "LONG", "SHORT", "ICLResult", "compute_icl", "draw_trials", "icl_trials", "tokenize_lengths")}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
