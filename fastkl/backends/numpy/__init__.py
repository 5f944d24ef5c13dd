"""The ``numpy`` backend: plain numpy, what users get where neither compiled backend works.

``mc`` (Monte Carlo) and ``logits`` (full-vocabulary ops) are the readable specification of
the kernel contract; every backend is tested against them, under the hidden backend name
``"reference"`` (``backends/reference``). The Monte Carlo functions exported here are
``fast``: the same contract blocked over cache-sized tiles, with float32 lanes for float32
inputs (issue 12, item 6); the logits ops are the specification's.
"""

from .fast import mc_grad, mc_partials, mc_terms
from .logits import logits_grad, logits_rows, logits_token, logits_token_grad
from .mc import expm1_minus_x, term_and_grad

name = "numpy"

__all__ = ["expm1_minus_x", "logits_grad", "logits_rows", "logits_token", "logits_token_grad",
           "mc_grad", "mc_partials", "mc_terms", "name", "term_and_grad"]
