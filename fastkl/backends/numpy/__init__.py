"""The reference backend: plain numpy, written to be read, never optimized.

It *is* the specification of the kernel contract (``backends/_contract.py``): ``mc`` the
Monte Carlo terms and partials, ``logits`` the full-vocabulary ops. Every compiled backend is
tested against it.
"""

from .logits import logits_grad, logits_rows, logits_token, logits_token_grad
from .mc import expm1_minus_x, mc_grad, mc_partials, mc_terms, term_and_grad

name = "numpy"

__all__ = ["expm1_minus_x", "logits_grad", "logits_rows", "logits_token", "logits_token_grad",
           "mc_grad", "mc_partials", "mc_terms", "name", "term_and_grad"]
