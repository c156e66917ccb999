"""In-context learning score (the paper's Figure 5): loss with 50 tokens of context minus loss with 500."""

from attnlab.icl.score import ICL_PROTOCOLS, LONG, SHORT, ICLResult, compute_icl, draw_trials, icl_trials, tokenize_lengths

__all__ = ["ICL_PROTOCOLS", "LONG", "SHORT", "ICLResult", "compute_icl", "draw_trials", "icl_trials", "tokenize_lengths"]
