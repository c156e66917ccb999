"""A researcher's own text: every head's attention on it (with a head finder), and the logit and tuned lenses.
Records ``ATTENTION`` and ``LENS`` in ``attnlab.text.experiment``."""
