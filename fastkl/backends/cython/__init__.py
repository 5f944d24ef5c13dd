"""The Cython backend of the kernel contract (``backends/_contract.py``).

``mc`` and ``logits`` are thin wrappers (array layout only, never a modified input) over the
compiled extensions ``_mc`` and ``_logits``, whose arithmetic is in the C headers ``mc.h``
and ``logits.h`` (with ``common.h``: the exp pieces, multiversioning and OpenMP helpers).
Importing this package raises ImportError when the extensions are not built, which makes the
registry mark the backend unavailable.
"""

try:
    from . import _logits, _mc  # noqa: F401
except ImportError as exc:  # the optional extensions were not compiled at install time
    raise ImportError(
        f"the Cython extension {getattr(exc, 'name', None) or 'fastkl.backends.cython'} is not "
        "built (installing it needs a C compiler; reinstall fastkl from source where one "
        f"exists) [{exc}]"
    ) from exc

from .logits import logits_grad, logits_rows, logits_token, logits_token_grad  # noqa: E402
from .mc import isa, mc_grad, mc_partials, mc_terms  # noqa: E402

name = "cython"

__all__ = ["isa", "logits_grad", "logits_rows", "logits_token", "logits_token_grad", "mc_grad",
           "mc_partials", "mc_terms", "name"]
