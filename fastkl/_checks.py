"""Every input check and error message of the public API, in one place.

Checks never modify their inputs; when an array must change dtype or byte order they return
a converted copy and leave the caller's array alone.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _estimators

NAN_POLICIES = ("propagate", "omit", "raise")
PLAIN_REDUCTIONS = ("none", "mean", "sum")
RL_REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# taken by kl_mc / kl_mc_grad only (not by the accumulators, files or dask graphs)
NORM_REDUCTIONS = ("seq-mean-token-sum-norm",)
SEQ_REDUCTIONS = ("seq-mean-token-mean", "seq-mean-token-sum")
EMPTY_ROWS = ("skip", "zero")
CLAMP_ORDERS = ("term", "weighted")
GRAD_WRT = ("logq", "logp", "log_iw")
JSD_ENDPOINTS = ("mixture", "kl")


def _to_numpy(x):
    """numpy view of an array-like; torch tensors (CPU) go through ``.numpy()``."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__ or ""
    if mod.startswith("torch"):
        t = x.detach()
        if t.device.type != "cpu":
            raise TypeError("torch tensors must be on the CPU")
        if not t.dtype.is_floating_point:
            return t.numpy()
        if t.dtype.itemsize == 2 and str(t.dtype) == "torch.bfloat16":
            bf16 = bfloat16_dtype()
            if bf16 is None:
                return t.float().numpy()  # numpy has no bfloat16 without ml_dtypes: widen
            import torch  # already imported: x is a tensor

            # the raw 16-bit buffer, read in place (a view, no copy)
            return t.view(torch.int16).numpy().view(bf16)
        return t.numpy()
    return np.asarray(x)


_BF16: list = []


def bfloat16_dtype() -> np.dtype | None:
    """numpy's bfloat16 dtype (``ml_dtypes.bfloat16``, optional), or None without ml_dtypes."""
    if not _BF16:
        try:
            import ml_dtypes
        except ImportError:
            _BF16.append(None)
        else:
            _BF16.append(np.dtype(ml_dtypes.bfloat16))
    return _BF16[0]


def half_kind(dtype: np.dtype) -> str | None:
    """"float16" or "bfloat16" for the 16-bit float dtypes the kernels read in place (native
    byte order), else None."""
    if dtype.itemsize != 2:
        return None
    if dtype.kind == "f":
        return "float16" if dtype.isnative else None
    if dtype.kind == "V" and dtype.name == "bfloat16" and dtype.names is None:
        return "bfloat16"
    return None


def float_array(x, name: str, int_lists: bool = False) -> np.ndarray:
    """``x`` as a numpy floating array (float16/32/64 kept, longdouble -> float64).

    ``int_lists`` (the sample-based functions, whose README promises lists): Python
    sequences and scalars of integers (``[0, 1]``) become float64. Integer *arrays* stay a
    TypeError, and so do integer lists of logits (token ids passed by mistake)."""
    if x is None:
        raise TypeError(f"{name} must be a float array, got None")
    try:
        a = _to_numpy(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    if int_lists and a.dtype.kind in "iu" and not isinstance(x, np.ndarray) and \
            not (type(x).__module__ or "").startswith("torch"):
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{name} could not be converted to a float array: {exc}") from None
    if a.dtype.kind != "f" and half_kind(a.dtype) is None:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {a.dtype}"
        )
    if a.dtype.itemsize > 8:
        a = a.astype(np.float64)
    return a


def compute_dtype(*arrays: np.ndarray) -> np.dtype:
    """float64 if any input is float64, else float32 (float16 and bfloat16 are computed in
    float32)."""
    if any(a.dtype.itemsize == 8 for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def as_kernel_dtype(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` in ``dtype`` and native byte order (a copy only where needed)."""
    if a.dtype == dtype and a.dtype.isnative:
        return a
    return a.astype(dtype.newbyteorder("="))


def as_kernel_input(a: np.ndarray, dtype: np.dtype, half: np.dtype | None) -> np.ndarray:
    """``as_kernel_dtype``, except that a 16-bit float array of dtype ``half`` (native float16
    or bfloat16; the kernel contract reads those in place, widened to float32 in registers)
    is passed through unchanged when ``dtype`` is float32."""
    if half is not None and a.dtype == half and dtype == np.float32:
        return a
    return as_kernel_dtype(a, dtype)


def common_half(*arrays: np.ndarray) -> np.dtype | None:
    """The 16-bit float dtype all ``arrays`` share (native float16, or bfloat16), else None:
    mixed dtypes (bfloat16 with float32, float16 with bfloat16) are converted to float32."""
    dt = arrays[0].dtype
    if half_kind(dt) is None or any(a.dtype != dt for a in arrays[1:]):
        return None
    return dt


def same_shape(a: np.ndarray, shape: tuple, name: str, ref: str = "logq") -> None:
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but {ref} has shape {shape}")


def estimator_code(estimator, reverse) -> int:
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    names = _estimators.NAMES
    if not isinstance(estimator, str) or estimator not in names:
        choices = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise ValueError(f"estimator must be {choices}, got {estimator!r}")
    row = _estimators.lookup(estimator, reverse)
    if row is None:
        rev = " or ".join(repr(n) for n in _estimators.REVERSIBLE)
        raise ValueError(
            f"estimator {estimator!r} has no reverse (KL(p||q)) form; use {rev} "
            "with reverse=True"
        )
    return row.code


def grad_estimator_code(grad_estimator, reverse) -> int | None:
    """The kernel code of ``grad_estimator`` (taken with the same ``reverse``), or None."""
    if grad_estimator is None:
        return None
    names = _estimators.NAMES
    if not isinstance(grad_estimator, str) or grad_estimator not in names:
        choices = ", ".join(repr(n) for n in names)
        raise ValueError(f"grad_estimator must be None or one of {choices}, got "
                         f"{grad_estimator!r}")
    row = _estimators.lookup(grad_estimator, reverse)
    if row is None:
        raise ValueError(f"grad_estimator {grad_estimator!r} has no reverse (KL(p||q)) form; "
                         f"with reverse=True use None or one of "
                         f"{list(_estimators.REVERSIBLE)}")
    return row.code


def flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def reduction(value, ndim: int, allow_rl: bool = True, allow_norm: bool = False) -> str:
    allowed = (PLAIN_REDUCTIONS + (RL_REDUCTIONS if allow_rl else ())
               + (NORM_REDUCTIONS if allow_norm else ()))
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {value!r}")
    if (value in RL_REDUCTIONS or value in NORM_REDUCTIONS) and ndim != 2:
        raise ValueError(
            f"reduction={value!r} needs 2-D [batch, tokens] inputs, got {ndim}-D"
        )
    return value


def axes(axis, ndim: int) -> tuple[int, ...] | None:
    """Normalized, sorted tuple of axes (None: all)."""
    if axis is None:
        return None
    items = axis if isinstance(axis, tuple) else (axis,)
    out = [_axis_index(ax, ndim, "axis must be None, an int or a tuple of ints", axis)
           for ax in items]
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def mask_array(mask, shape: tuple, ref: str = "logq") -> np.ndarray | None:
    """None, a uint8 view of a bool mask, or float64 weights (finite, >= 0)."""
    if mask is None:
        return None
    try:
        m = _to_numpy(mask)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"mask could not be converted to an array: {exc}") from None
    same_shape(m, shape, "mask", ref)
    if m.dtype == np.bool_:
        return m.view(np.uint8)
    if m.dtype.kind not in "iuf":
        raise TypeError(f"mask must be bool or real numeric weights, got dtype {m.dtype}")
    w = m.astype(np.float64)  # always a copy: the kernels may read it freely
    if w.size and not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("mask weights must be finite and >= 0")
    return w


# Weights whose largest is outside [2**-250, 2**250] are scaled by a power of two before the
# kernels sum them wherever only ratios are wanted (means, std, sem, n_eff): sum w**2 of
# 1e-200 underflows to 0, sum w of 1e308 overflows. Inside the range nothing changes (n * w**2
# fits for any n < 2**63); a power of two is exact, so ratios keep their bits either way.
_W_LO, _W_HI = 2.0**-250, 2.0**250


def weight_exponent(w: np.ndarray | None) -> int:
    """e such that ``w / 2**e`` has its largest weight in [0.5, 1) when the largest weight
    of float64 weights ``w`` (``mask_array``'s) is outside [2**-250, 2**250]; else 0 (and 0
    for None, a boolean mask or all-zero weights)."""
    if w is None or w.dtype != np.float64 or w.size == 0:
        return 0
    m = float(w.max())
    if m == 0.0 or _W_LO <= m <= _W_HI:
        return 0
    return math.frexp(m)[1]


def scale_weights(w: np.ndarray | None) -> int:
    """Divide ``mask_array``'s float64 weights (a private copy) in place by ``2**e``,
    ``e = weight_exponent(w)``, and return e (0: unchanged). Sums of the scaled weights are
    in units of ``2**e``."""
    e = weight_exponent(w)
    if e:
        np.ldexp(w, -e, out=w)
    return e


def log_iw_array(log_iw, shape: tuple, dtype: np.dtype,
                 half: np.dtype | None = None) -> np.ndarray | None:
    """``log_iw`` for the kernels: in ``dtype``, or unchanged when it is of the 16-bit dtype
    ``half`` of logq / logp (``as_kernel_input``)."""
    if log_iw is None:
        return None
    a = float_array(log_iw, "log_iw", int_lists=True)
    same_shape(a, shape, "log_iw")
    return as_kernel_input(a, dtype, half)


def clamp_pair(value, name: str) -> tuple[float, float]:
    if value is None:
        return (-math.inf, math.inf)
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        lo, hi = value
        lo, hi = real_scalar(lo, name), real_scalar(hi, name)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be None or a (lo, hi) pair of numbers, got {value!r}"
        ) from None
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} bounds must not be NaN, got {value!r}")
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi, got {value!r}")
    return (lo, hi)


def nan_policy(value) -> str:
    if not isinstance(value, str) or value not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {list(NAN_POLICIES)}, got {value!r}")
    return value


def single_axis(axis, ndim: int) -> int:
    """A single axis, normalized to 0..ndim-1."""
    return _axis_index(axis, ndim, "axis must be an int", axis)


def _axis_index(ax, ndim: int, expected: str, given) -> int:
    """``ax`` as an axis of an ``ndim``-D array, normalized to 0..ndim-1; a non-integer is
    the TypeError ``"{expected}, got {given!r}"``."""
    try:
        i = operator.index(ax)
    except TypeError:
        raise TypeError(f"{expected}, got {given!r}") from None
    if not -ndim <= i < ndim:
        raise ValueError(f"axis {ax} is out of range for {ndim}-D input")
    return i % ndim


def real_scalar(value, name: str) -> float:
    """A real number (Python/numpy int or float, 0-d real array) as a float; strings, bools,
    complex numbers and arrays of more than one element are a TypeError."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or (
        isinstance(value, np.ndarray) and (value.ndim != 0 or value.dtype.kind not in "iuf")
    ):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, (complex, np.complexfloating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def temperature(value) -> float:
    t = real_scalar(value, "temperature")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {value!r}")
    return t


def positive_count(value, name: str) -> float:
    """A finite number > 0 (a normaliser: ``norm``, ``denominator``) as a float."""
    v = real_scalar(value, name)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def empty_value(value) -> float:
    """``empty``: any real number (NaN and infinities included) as a float."""
    return real_scalar(value, "empty")


def choice(value, allowed: tuple, name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def beta(value) -> float:
    b = real_scalar(value, "beta")
    if not 0.0 <= b <= 1.0:  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1], got {value!r}")
    return b


def tokens_array(tokens, shape: tuple, vocab: int, ignore_index) -> np.ndarray:
    """int64 token ids of ``shape``; each in [0, vocab) or equal to ``ignore_index``."""
    try:
        ignore = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}") from None
    try:
        t = _to_numpy(tokens)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tokens could not be converted to an array: {exc}") from None
    if t.dtype.kind not in "iu":
        raise TypeError(f"tokens must be an integer array, got dtype {t.dtype}")
    if t.shape != shape:
        raise ValueError(
            f"tokens has shape {t.shape} but logits without the vocabulary axis have shape {shape}"
        )
    i64 = np.iinfo(np.int64)
    if not i64.min <= ignore <= i64.max:
        raise ValueError(f"ignore_index must fit in int64, got {ignore}")
    # the range is checked in the tokens' own dtype, before any cast: a cast first would wrap
    # (uint64 2**64 - 100 -> -100, the ignore index) and drop the row silently
    info = np.iinfo(t.dtype)
    bad = (t >= vocab) if vocab <= info.max else np.zeros(t.shape, dtype=bool)
    if t.dtype.kind == "i":
        bad |= t < 0
    if info.min <= ignore <= info.max:
        bad &= t != np.array(ignore, dtype=t.dtype)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        pos = tuple(int(k) for k in np.unravel_index(i, t.shape))
        raise ValueError(
            f"tokens must be in [0, {vocab}) or equal ignore_index={ignore}; "
            f"found {int(t.ravel()[i])} at index {pos} (flat index {i})"
        )
    return t.astype(np.int64)  # exact: every value is now in [0, vocab) or ignore
