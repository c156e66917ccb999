"""First-layer attention decomposed from the weights: token and position terms, positional patterns, head
classes, normalisation factors, and the bag of tokens first-layer neurons read. Record: ``DECOMPOSE`` in
``attnlab.firstlayer.experiment``."""
