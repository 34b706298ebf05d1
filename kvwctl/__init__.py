"""kvwctl: training-free unlearning by Knowledge Vector Weakening (KVW).

The pipeline is four file-to-file stages, each a module with a pure tensor layer and one entry
point: ``profile`` (knowledge coefficients of a data split), ``accessor`` (forget exposure per
knowledge vector), ``apply`` (a new checkpoint with the vectors scaled by ``exp(-gamma * E)``),
and ``eval``. The command line in ``kvwctl.cli`` only parses options and calls them.
"""

__version__ = "0.1.0"
