"""The shared core: model loading, the batched attention extractor, per-head weights, output helpers.

Nothing outside this package runs a model with ``output_attentions=True``; experiments ask the
extractor for the attention rows they need.
"""
