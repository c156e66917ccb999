"""One module per experiment, plus the ``attnlab`` command line (``cli``)."""
