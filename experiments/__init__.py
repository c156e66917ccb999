"""The command line, the paper's reproduction and its report, the interactive views and multi-model jobs.

No science here: each experiment is a science module plus a record in its own package (``attnlab.core.runs``)."""
