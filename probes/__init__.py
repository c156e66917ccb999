"""Probing classifiers with control tasks (Hewitt and Liang 2019): what each layer's hidden states encode, and how
selective the probe is. Record ``PROBE`` in ``attnlab.probes.experiment``."""
