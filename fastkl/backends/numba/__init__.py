"""The numba backend of the kernel contract (``backends/_contract.py``).

``mc``: Monte Carlo terms, partials and gradients; ``logits``: the full-vocabulary ops;
``common``: the math and threading helpers both share (exp pieces, strided geometry, the
fork-aware threaded kernels); ``cache``: the on-disk compile cache keyed on this source.
Importing this package imports numba but compiles nothing.
"""

from .logits import logits_grad, logits_rows, logits_token, logits_token_grad
from .mc import mc_grad, mc_partials, mc_terms

name = "numba"

__all__ = ["logits_grad", "logits_rows", "logits_token", "logits_token_grad", "mc_grad",
           "mc_partials", "mc_terms", "name"]
