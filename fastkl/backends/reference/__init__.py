"""The hidden ``"reference"`` backend: the readable specification of the kernel contract.

It is ``backends/numpy/mc.py`` and ``backends/numpy/logits.py`` as written (plain float64
numpy over whole arrays, never optimized), under its own name so the tests and benchmarks
can use it as their oracle while the public ``"numpy"`` backend runs the blocked, float32-lane
version of the same contract (``backends/numpy/fast.py``). ``get_backend("reference")`` and
``backend="reference"`` accept it; ``available_backends()`` does not list it.
"""

from ..numpy.logits import logits_grad, logits_rows, logits_token, logits_token_grad
from ..numpy.mc import expm1_minus_x, mc_grad, mc_partials, mc_terms, term_and_grad

name = "reference"

__all__ = ["expm1_minus_x", "logits_grad", "logits_rows", "logits_token", "logits_token_grad",
           "mc_grad", "mc_partials", "mc_terms", "name", "term_and_grad"]
