"""fastkl: fast, accurate KL divergences — Monte Carlo estimators from samples and exact
values over full vocabularies — from fused Numba and Cython kernels checked against a
numpy reference."""

from .backends import available_backends
from .backends._threads import get_num_threads, set_num_threads, threads
from .logits import (
    entropy_logits,
    entropy_logits_grad,
    jsd_logits,
    jsd_logits_grad,
    kl_logits,
    kl_logits_grad,
    token_logprobs,
    token_logprobs_grad,
)
from .mc import KLStats, kl_mc, kl_mc_grad, kl_mc_stats
from .outofcore import MCFileReport, compare_logits, kl_mc_file
from .stream import LogitsAccumulator, LogitsReport, MCAccumulator

__version__ = "0.1.0"

__all__ = [
    "KLStats",
    "LogitsAccumulator",
    "LogitsReport",
    "MCAccumulator",
    "MCFileReport",
    "__version__",
    "available_backends",
    "compare_logits",
    "entropy_logits",
    "entropy_logits_grad",
    "get_num_threads",
    "jsd_logits",
    "jsd_logits_grad",
    "kl_logits",
    "kl_logits_grad",
    "kl_mc",
    "kl_mc_file",
    "kl_mc_grad",
    "kl_mc_stats",
    "set_num_threads",
    "threads",
    "token_logprobs",
    "token_logprobs_grad",
]
