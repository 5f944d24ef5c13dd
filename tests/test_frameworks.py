"""The RL and distillation frameworks' aggregations and losses, written in torch from their
documented arithmetic, against fastkl (value and, for ``kl_mc_grad``, the gradient via
torch autograd), in float32 and float64.

References (read from the frameworks' source):

* verl ``trainer/ppo/core_algos.py::agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size,
  batch_num_tokens, global_batch_size, loss_scale_factor)``: token-mean ``masked_sum /
  batch_num_tokens * dp_size`` (default ``loss_mask.sum()``); seq-mean-token-sum / -mean:
  per-row sum / mean (``sum / (count + 1e-8)``) summed over rows with a token, ``/
  global_batch_size * dp_size`` (default: the number of rows with a token);
  seq-mean-token-sum-norm: ``sum(loss_mat * loss_mask) / loss_scale_factor`` (default
  ``loss_mask.shape[-1]``), not divided by the batch size.
* TRL ``trainer/grpo_trainer.py`` ``loss_type``: "grpo" ``((l * m).sum(-1) /
  m.sum(-1).clamp(min=1)).mean()``; "bnpo" ``(l * m).sum() / m.sum().clamp(min=1)``;
  "dr_grpo" ``(l * m).sum() / (l.size(0) * max_completion_length)``; the logged KL
  ``(kl * m).sum() / m.sum()``.
* TRL ``trainer/gkd_trainer.py::generalized_jsd_loss(student_logits, teacher_logits,
  labels, beta, temperature)``: beta 0 ``kl_div(student_logp, teacher_logp)`` = KL(teacher
  || student), beta 1 KL(student || teacher), else ``beta KL(T || M) + (1 - beta) KL(S ||
  M)``, ``M = beta T + (1 - beta) S``; "batchmean" with labels: sum over the tokens whose
  label is not -100 / their count.
* Liger ``LigerJSD`` / ``LigerFusedLinearJSD`` (``log_q`` the student, ``log_p`` the
  teacher, same beta mapping and mixture): loss 0.0 when every label is ``ignore_index``.
* verl ``core_algos.py::kl_penalty(logprob, ref_logprob, kl_penalty)``: the forward score of
  ``kl_penalty_forward`` ("k1"/"kl" ``logprob - ref``, "abs" its absolute value, "k2"/"mse"
  half its square, "low_var_kl"/"k3": ``d = clamp(ref - logprob, -20, 20)``,
  ``clamp(exp(d) - d - 1, -10, 10)``); a mode ending in "+" returns ``b - b.detach() +
  forward.detach()`` with ``b = 0.5 (logprob - ref)**2`` (straight-through k2 gradient).
* NeMo-RL ``algorithms/utils.py::calculate_kl(logprobs, logprobs_reference, kl_type,
  input_clamp_value, output_clamp_value, importance_sampling_weights)``: ``logr = ref -
  logprobs`` clamped to +-input_clamp (the weight detached where that clamp changes logr),
  k1 ``-logr``, k2 ``logr**2 / 2``, k3 ``exp(logr) - 1 - logr``, times the weights, then
  clamped to +-output_clamp; the loss (``ClippedPGLossFn``) weights by ``exp(curr -
  generation)`` (on-policy KL approximation) or ``exp(curr - curr.detach())``, both
  differentiated, and ``masked_mean(kl, mask, global_valid_toks)`` = ``sum(kl * mask) /
  (global_valid_toks + 1e-8)``.
* TRL ``grpo_trainer.py`` with ``use_bias_correction_kl``: ``per_token_kl * coef_1``,
  ``coef_1 = exp(per_token_logps - old_per_token_logps)`` (not detached).
* verl ``utils/torch_functional.py::entropy_from_logits`` (``logsumexp(logits) -
  sum(softmax(logits) * logits)``) and ``logprobs_from_logits``; TRL
  ``selective_log_softmax(logits, index)`` (log_softmax gathered at the token); the forward
  KL of distillation as ``kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)``:
  values and gradients through ``fastkl.torch``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastkl

torch = pytest.importorskip("torch")

DTYPES = [np.float32, np.float64]


def _tol(dtype):
    return dict(rtol=2e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)


def _inputs(dtype, B=6, T=9, seed=0, empty_row=True):
    rng = np.random.default_rng(seed)
    logq = (rng.normal(size=(B, T)) - 2.0).astype(dtype)  # the policy (samples' dist.)
    logp = (logq + 0.5 * rng.normal(size=(B, T))).astype(dtype)  # the reference
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = True
    if empty_row:
        mask[2] = False  # a row without tokens
    return logq, logp, mask


def _k3_torch(logq, logp):
    """TRL / verl low_var_kl unclamped: exp(ref - logp) - (ref - logp) - 1."""
    q = torch.tensor(logq, requires_grad=True)
    p = torch.tensor(logp)
    d = p - q
    return q, torch.exp(d) - d - 1


def _check(ref_fn, fastkl_kwargs, dtype, mask=None, inputs=None, scale=1.0, tol=None):
    logq, logp, m = _inputs(dtype) if inputs is None else inputs
    m = m if mask is None else mask
    q, kl = _k3_torch(logq, logp)
    mt = torch.tensor(m, dtype=kl.dtype)
    ref = ref_fn(kl, mt)
    ref.backward()
    tol = _tol(dtype) if tol is None else tol
    value = fastkl.kl_mc(logq, logp, "k3", mask=m, **fastkl_kwargs)
    np.testing.assert_allclose(value * scale, ref.item(), **tol)
    gvalue, grad = fastkl.kl_mc_grad(logq, logp, "k3", mask=m, **fastkl_kwargs)
    assert grad.dtype == dtype
    np.testing.assert_allclose(gvalue * scale, ref.item(), **tol)
    np.testing.assert_allclose(grad * scale, q.grad.numpy(), **tol)
    return value


# --------------------------------------------------------------------------- verl agg_loss


def verl_agg_loss(loss_mat, loss_mask, mode, dp_size=1, batch_num_tokens=None,
                  global_batch_size=None, loss_scale_factor=None):
    if mode == "token-mean":
        n = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * loss_mask).sum() / n * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq = (loss_mat * loss_mask).sum(-1)
        count = loss_mask.sum(-1)
        if mode == "seq-mean-token-mean":
            seq = seq / (count + 1e-8)
        seq_mask = (count > 0).to(loss_mat.dtype)
        n = seq_mask.sum() if global_batch_size is None else global_batch_size
        return (seq * seq_mask).sum() / n * dp_size
    if mode == "seq-mean-token-sum-norm":
        norm = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return (loss_mat * loss_mask).sum(-1).sum() / norm
    raise ValueError(mode)


def _verl_tol(dtype, mode):
    # verl's seq-mean-token-mean divides by (count + 1e-8): a relative 1e-8 / count
    if mode == "seq-mean-token-mean" and dtype == np.float64:
        return dict(rtol=2e-8, atol=1e-14)
    return _tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_verl_agg_loss(dtype, mode):
    _check(lambda kl, m: verl_agg_loss(kl, m, mode), dict(reduction=mode), dtype,
           tol=_verl_tol(dtype, mode))


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_seq_mean_token_sum_norm_given_factor(dtype):
    _check(lambda kl, m: verl_agg_loss(kl, m, "seq-mean-token-sum-norm",
                                       loss_scale_factor=512),
           dict(reduction="seq-mean-token-sum-norm", norm=512), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_verl_data_parallel_denominators(dtype, mode):
    """Two shards with verl's global ``batch_num_tokens`` / ``global_batch_size``: fastkl's
    ``denominator`` gives the shard's share (verl's value / dp_size), and the shares add up
    to the unsharded result."""
    logq, logp, m = _inputs(dtype, B=8)
    if mode == "token-mean":
        denom = float(m.sum())
        verl_kw = dict(batch_num_tokens=denom)
    else:
        denom = float((m.sum(-1) > 0).sum())
        verl_kw = dict(global_batch_size=denom)
    dp = 2
    shares = []
    for sl in (slice(0, 4), slice(4, 8)):
        inputs = (logq[sl], logp[sl], m[sl])
        shares.append(_check(lambda kl, mt: verl_agg_loss(kl, mt, mode, dp_size=dp, **verl_kw),
                             dict(reduction=mode, denominator=denom), dtype, inputs=inputs,
                             scale=dp, tol=_verl_tol(dtype, mode)))
    whole = fastkl.kl_mc(logq, logp, "k3", mask=m, reduction=mode)
    np.testing.assert_allclose(sum(shares), whole, **_tol(dtype))


# --------------------------------------------------------------------------- TRL GRPO


def trl_loss(per_token, mask, loss_type, max_completion_length=None):
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    if loss_type == "logged_kl":
        return (per_token * mask).sum() / mask.sum()
    raise ValueError(loss_type)


TRL_SETTINGS = {
    "grpo": dict(reduction="seq-mean-token-mean", empty_rows="zero"),
    "bnpo": dict(reduction="token-mean", empty=0.0),
    "logged_kl": dict(reduction="token-mean"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "logged_kl"])
def test_trl_grpo_loss_types(dtype, loss_type):
    _check(lambda kl, m: trl_loss(kl, m, loss_type), TRL_SETTINGS[loss_type], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_dr_grpo(dtype):
    B, L = 6, 16  # max_completion_length beyond the padded width
    _check(lambda kl, m: trl_loss(kl, m, "dr_grpo", L),
           dict(reduction="seq-mean-token-sum-norm", norm=B * L), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_trl_all_empty_mask(dtype, loss_type):
    logq, logp, m = _inputs(dtype)
    none = np.zeros_like(m)
    v = _check(lambda kl, mt: trl_loss(kl, mt, loss_type), TRL_SETTINGS[loss_type], dtype,
               mask=none)
    assert v == 0.0
    _, grad = fastkl.kl_mc_grad(logq, logp, "k3", mask=none, **TRL_SETTINGS[loss_type])
    assert not grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_logged_kl_all_empty_is_nan(dtype):
    logq, logp, m = _inputs(dtype)
    none = np.zeros_like(m)
    q, kl = _k3_torch(logq, logp)
    assert math.isnan(trl_loss(kl, torch.tensor(none, dtype=kl.dtype), "logged_kl").item())
    assert math.isnan(fastkl.kl_mc(logq, logp, "k3", mask=none, reduction="token-mean"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_kl_mc_passes_options(dtype):
    """``fastkl.torch.kl_mc`` with the aggregation options: TRL grpo and dr_grpo,
    differentiated by torch."""
    ft = pytest.importorskip("fastkl.torch")
    logq, logp, m = _inputs(dtype)
    for loss_type, kw in (("grpo", TRL_SETTINGS["grpo"]),
                          ("dr_grpo", dict(reduction="seq-mean-token-sum-norm", norm=6 * 16))):
        q, kl = _k3_torch(logq, logp)
        mt = torch.tensor(m, dtype=kl.dtype)
        ref = trl_loss(kl, mt, loss_type, 16)
        ref.backward()
        q2 = torch.tensor(logq, requires_grad=True)
        out = ft.kl_mc(q2, torch.tensor(logp), "k3", mask=torch.tensor(m), **kw)
        out.backward()
        np.testing.assert_allclose(out.item(), ref.item(), **_tol(dtype))
        np.testing.assert_allclose(q2.grad.numpy(), q.grad.numpy(), **_tol(dtype))


# --------------------------------------------------------------------------- semantics


def test_empty_rows_and_empty_options():
    logq, logp, m = _inputs(np.float64)
    skip = fastkl.kl_mc(logq, logp, mask=m, reduction="seq-mean-token-sum")
    zero = fastkl.kl_mc(logq, logp, mask=m, reduction="seq-mean-token-sum", empty_rows="zero")
    np.testing.assert_allclose(zero, skip * 5 / 6, rtol=1e-14)
    none = np.zeros_like(m)
    for red in ("mean", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert math.isnan(fastkl.kl_mc(logq, logp, mask=none, reduction=red))
        assert fastkl.kl_mc(logq, logp, mask=none, reduction=red, empty=-1.5) == -1.5
        v, g = fastkl.kl_mc_grad(logq, logp, mask=none, reduction=red, empty=0.0)
        assert v == 0.0 and not g.any()
    rows = fastkl.kl_mc(logq, logp, mask=m, reduction="mean", axis=1, empty=7.0)
    assert rows[2] == 7.0 and np.isfinite(rows).all()
    # the defaults are the same bits as before
    for red in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        a = fastkl.kl_mc(logq, logp, mask=m, reduction=red)
        b = fastkl.kl_mc(logq, logp, mask=m, reduction=red, empty_rows="skip",
                         empty=float("nan"))
        assert a == b


def test_option_errors():
    logq, logp, m = _inputs(np.float64)
    cases = [
        (dict(reduction="mean", denominator=4), ValueError, "denominator"),
        (dict(reduction="sum", denominator=4), ValueError, "denominator"),
        (dict(reduction="seq-mean-token-sum-norm", denominator=4), ValueError, "denominator"),
        (dict(reduction="token-mean", denominator=0), ValueError, "denominator"),
        (dict(reduction="token-mean", denominator=float("nan")), ValueError, "denominator"),
        (dict(reduction="token-mean", denominator="8"), TypeError, "denominator"),
        (dict(reduction="token-mean", norm=4), ValueError, "norm"),
        (dict(reduction="seq-mean-token-sum-norm", norm=-1), ValueError, "norm"),
        (dict(reduction="seq-mean-token-sum-norm", norm=math.inf), ValueError, "norm"),
        (dict(reduction="seq-mean-token-mean", empty_rows="drop"), ValueError, "empty_rows"),
        (dict(reduction="token-mean", empty_rows="zero"), ValueError, "empty_rows"),
        (dict(reduction="token-mean", empty="0"), TypeError, "empty"),
    ]
    for kw, exc, word in cases:
        for fn in (fastkl.kl_mc, fastkl.kl_mc_grad):
            with pytest.raises(exc, match=word):
                fn(logq, logp, mask=m, **kw)
    with pytest.raises(ValueError, match="2-D"):
        fastkl.kl_mc(logq.ravel(), logp.ravel(), reduction="seq-mean-token-sum-norm")


def test_norm_reduction_not_for_accumulators():
    """"seq-mean-token-sum-norm" is for kl_mc, kl_mc_grad, kl_mc_file and dask graphs: the
    shared reduction check without allow_norm (the accumulators') does not take it."""
    from fastkl import _checks

    with pytest.raises(ValueError, match="reduction must be one of"):
        _checks.reduction("seq-mean-token-sum-norm", 2)


AGG_CASES = [
    dict(reduction="seq-mean-token-sum-norm"),
    dict(reduction="seq-mean-token-sum-norm", norm=37.0),
    dict(reduction="seq-mean-token-mean", empty_rows="zero"),
    dict(reduction="seq-mean-token-sum", empty_rows="zero"),
    dict(reduction="seq-mean-token-mean", denominator=11.0),
    dict(reduction="token-mean", denominator=50.0),
    dict(reduction="token-mean", empty=0.0),
]


@pytest.mark.parametrize("case", AGG_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_file_and_dask_take_the_aggregation_options(case, tmp_path):
    """kl_mc_file (.value) and dask graphs give kl_mc's number for every aggregation option
    (an empty row included; an all-empty mask for the `empty` case)."""
    logq, logp, m = _inputs(np.float64, B=7, T=10)
    masks = [m, np.zeros_like(m)] if "empty" in case else [m]
    for mask in masks:
        ref = fastkl.kl_mc(logq, logp, mask=mask, **case)
        for name, a in (("q", logq), ("p", logp), ("m", mask)):
            np.save(tmp_path / f"{name}.npy", a)
        rep = fastkl.kl_mc_file(tmp_path / "q.npy", tmp_path / "p.npy", mask=tmp_path / "m.npy",
                                **case)
        np.testing.assert_allclose(rep.value, ref, rtol=1e-13)
        da = pytest.importorskip("dask.array")
        got = fastkl.kl_mc(da.from_array(logq, chunks=(3, 4)), da.from_array(logp, chunks=(3, 4)),
                           mask=da.from_array(mask, chunks=(3, 4)), **case).compute()
        np.testing.assert_allclose(float(got), ref, rtol=1e-13)


# --------------------------------------------------------------------------- GKD / Liger


def gkd_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5,
                        temperature=1.0):
    F = torch.nn.functional
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = (beta * F.kl_div(mix, t, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(mix, s, reduction="none", log_target=True))
    per_token = jsd.sum(-1)
    if labels is None:
        return per_token.sum() / per_token.numel(), per_token
    keep = labels != -100
    return per_token[keep].sum() / keep.sum(), per_token


def liger_jsd(log_q, log_p, label, beta, ignore_index=-100):
    """Liger's reference arithmetic: log_q the student, log_p the teacher."""
    if beta == 0:
        loss = (torch.exp(log_p) * (log_p - log_q)).sum(-1)
    elif beta == 1:
        loss = (torch.exp(log_q) * (log_q - log_p)).sum(-1)
    else:
        m = torch.lerp(torch.exp(log_q), torch.exp(log_p), beta)
        lm = torch.log(m)
        loss = (beta * (torch.exp(log_p) * (log_p - lm)).sum(-1)
                + (1 - beta) * (torch.exp(log_q) * (log_q - lm)).sum(-1))
    keep = label != ignore_index
    n = int(keep.sum())
    if n == 0:
        return torch.zeros((), dtype=log_q.dtype)
    return torch.where(keep, loss, 0.0).sum() / n


def _logits(dtype, B=3, T=5, V=11, seed=1):
    rng = np.random.default_rng(seed)
    student = (2 * rng.normal(size=(B, T, V))).astype(dtype)
    teacher = (2 * rng.normal(size=(B, T, V))).astype(dtype)
    labels = rng.integers(0, V, size=(B, T))
    labels[0, :2] = -100
    labels[2, 3:] = -100
    return student, teacher, labels


def _ltol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_trl_gkd_generalized_jsd(dtype, beta, temperature):
    student, teacher, labels = _logits(dtype)
    ref, per_token = gkd_generalized_jsd(torch.tensor(student), torch.tensor(teacher),
                                         torch.tensor(labels), beta, temperature)
    keep = labels != -100
    v = fastkl.jsd_logits(teacher, student, beta, endpoints="kl", mask=keep,
                          reduction="mean", temperature=temperature)
    np.testing.assert_allclose(v, ref.item(), **_ltol(dtype))
    rows = fastkl.jsd_logits(teacher, student, beta, endpoints="kl", temperature=temperature)
    np.testing.assert_allclose(rows, per_token.numpy(), **_ltol(dtype))
    if 0 < beta < 1:  # in between the endpoints are the mixture's
        np.testing.assert_array_equal(
            rows, fastkl.jsd_logits(teacher, student, beta, temperature=temperature))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_jsd(dtype, beta):
    student, teacher, labels = _logits(dtype)
    F = torch.nn.functional
    s = F.log_softmax(torch.tensor(student), -1).reshape(-1, student.shape[-1])
    t = F.log_softmax(torch.tensor(teacher), -1).reshape(-1, teacher.shape[-1])
    lab = torch.tensor(labels).reshape(-1)
    ref = liger_jsd(s, t, lab, beta)
    v = fastkl.jsd_logits(teacher, student, beta, endpoints="kl", mask=labels != -100,
                          reduction="mean", empty=0.0)
    np.testing.assert_allclose(v, ref.item(), **_ltol(dtype))
    # every label ignored: Liger gives 0.0, fastkl too with empty=0.0 (NaN by default)
    ignored = torch.full_like(lab, -100)
    assert liger_jsd(s, t, ignored, beta).item() == 0.0
    none = np.zeros(labels.shape, bool)
    assert fastkl.jsd_logits(teacher, student, beta, endpoints="kl", mask=none,
                             reduction="mean", empty=0.0) == 0.0
    assert math.isnan(fastkl.jsd_logits(teacher, student, beta, endpoints="kl", mask=none,
                                        reduction="mean"))


def test_jsd_endpoints_semantics():
    student, teacher, _ = _logits(np.float64)
    kl_pq = fastkl.kl_logits(teacher, student)
    kl_qp = fastkl.kl_logits(student, teacher)
    np.testing.assert_array_equal(fastkl.jsd_logits(teacher, student, 0.0, endpoints="kl"),
                                  kl_pq)
    np.testing.assert_array_equal(fastkl.jsd_logits(teacher, student, 1.0, endpoints="kl"),
                                  kl_qp)
    assert not fastkl.jsd_logits(teacher, student, 0.0).any()  # the mixture's endpoints
    assert not fastkl.jsd_logits(teacher, student, 1.0, endpoints="mixture").any()
    with pytest.raises(ValueError, match="endpoints"):
        fastkl.jsd_logits(teacher, student, 0.5, endpoints="kl-reverse")


def test_logits_empty_option():
    student, teacher, _ = _logits(np.float64)
    none = np.zeros(student.shape[:-1], bool)
    for fn, args in ((fastkl.kl_logits, (teacher, student)), (fastkl.entropy_logits, (student,)),
                     (fastkl.jsd_logits, (teacher, student))):
        assert math.isnan(fn(*args, mask=none, reduction="mean"))
        assert fn(*args, mask=none, reduction="mean", empty=0.0) == 0.0
        assert fn(*args, mask=none, reduction="sum", empty=3.0) == 0.0
    v, g = fastkl.kl_logits_grad(teacher, student, mask=none, empty=0.0)
    assert v == 0.0 and not g.any()
    with pytest.raises(TypeError, match="empty"):
        fastkl.kl_logits(teacher, student, reduction="mean", empty=None)


def test_logits_empty_option_dask():
    """Dask graphs of the logits ops take empty= too: an all-masked mean is empty, a partly
    masked one equals the in-memory value."""
    da = pytest.importorskip("dask.array")
    student, teacher, _ = _logits(np.float64)
    none = np.zeros(student.shape[:-1], bool)
    some = none.copy()
    some[0, :2] = True
    ds, dt = da.from_array(student, chunks=(2, 3, -1)), da.from_array(teacher, chunks=(2, 3, -1))
    for fn, args, dargs in ((fastkl.kl_logits, (teacher, student), (dt, ds)),
                            (fastkl.entropy_logits, (student,), (ds,)),
                            (fastkl.jsd_logits, (teacher, student), (dt, ds))):
        assert fn(*dargs, mask=none, reduction="mean", empty=0.0).compute() == 0.0
        assert math.isnan(fn(*dargs, mask=none, reduction="mean").compute())
        got = fn(*dargs, mask=some, reduction="mean", empty=0.0).compute()
        assert math.isclose(got, fn(*args, mask=some, reduction="mean"), rel_tol=1e-13)
    with pytest.raises(TypeError, match="empty"):
        fastkl.kl_logits(dt, ds, reduction="mean", empty=None)


# --------------------------------------------------------------------------- clamps, "+" modes


def _clamp_inputs(dtype, B=5, T=12, seed=3):
    """Log-ratios with a tail beyond verl's clamps (|l| up to 25, k3 terms beyond 10)."""
    rng = np.random.default_rng(seed)
    logq = rng.normal(-2.0, 1.0, (B, T))
    l = rng.normal(0.0, 1.0, (B, T))
    l[:, :3] = rng.choice([-24.0, -15.0, 3.0, 4.5, 21.0, 30.0], size=(B, 3))
    mask = rng.random((B, T)) < 0.8
    mask[:, 0] = True
    return logq.astype(dtype), (logq + l).astype(dtype), mask


def verl_kl_penalty(logprob, ref, mode):
    base = mode[:-1] if mode.endswith("+") else mode
    if base in ("kl", "k1"):
        fwd = logprob - ref
    elif base == "abs":
        fwd = (logprob - ref).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (logprob - ref).square()
    elif base in ("low_var_kl", "k3"):
        d = torch.clamp(ref - logprob, min=-20, max=20)
        fwd = torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    else:
        raise ValueError(mode)
    if not mode.endswith("+") or base in ("mse", "k2"):
        return fwd
    b = 0.5 * (logprob - ref).square()
    return b - b.detach() + fwd.detach()


VERL_KL = {  # verl kl_penalty -> fastkl kl_mc_grad arguments
    "k1": dict(estimator="k1"),
    "abs": dict(estimator="abs"),
    "k2": dict(estimator="k2"),
    "low_var_kl": dict(estimator="k3", clamp_log_ratio=(-20, 20), clamp_value=(-10, 10)),
    "k1+": dict(estimator="k1", grad_estimator="k2"),
    "low_var_kl+": dict(estimator="k3", clamp_log_ratio=(-20, 20), clamp_value=(-10, 10),
                        grad_estimator="k2"),
}


def _grad_check(dtype, inputs, ref_fn, kw):
    logq, logp, m = inputs
    q = torch.tensor(logq, requires_grad=True)
    ref = ref_fn(q, torch.tensor(logp), torch.tensor(m, dtype=q.dtype))
    ref.backward()
    value, grad = fastkl.kl_mc_grad(logq, logp, mask=m, **kw)
    assert grad.dtype == dtype
    tol = _tol(dtype) if dtype == np.float32 else dict(rtol=2e-8, atol=1e-14)
    np.testing.assert_allclose(value, ref.item(), **tol)
    np.testing.assert_allclose(grad, q.grad.numpy(), **tol)
    return grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(VERL_KL))
def test_verl_kl_penalty_gradients(dtype, mode):
    """verl's penalties under its token-mean agg_loss: value and gradient, the clamped
    low_var_kl (gradient 0 where a clamp bites) and the straight-through "+" modes."""
    inputs = _clamp_inputs(dtype)
    grad = _grad_check(
        dtype, inputs,
        lambda q, p, m: verl_agg_loss(verl_kl_penalty(q, p, mode), m, "token-mean"),
        dict(reduction="token-mean", **VERL_KL[mode]))
    if mode == "low_var_kl":  # the clamps bite on the tail
        assert (grad[inputs[2]] == 0).sum() >= 5


def test_verl_low_var_kl_issue_example():
    q = torch.zeros(3, requires_grad=True)
    verl_kl_penalty(q, torch.tensor([0.1, 3.0, 25.0]), "low_var_kl").sum().backward()
    _, g = fastkl.kl_mc_grad(np.zeros(3, np.float32), np.array([0.1, 3, 25], np.float32), "k3",
                             reduction="sum", clamp_log_ratio=(-20, 20), clamp_value=(-10, 10))
    np.testing.assert_allclose(g, q.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(g, [-0.10517, 0.0, 0.0], rtol=1e-4)


def nemo_calculate_kl(logprobs, ref, kl_type, input_clamp, output_clamp, iw):
    logr = ref - logprobs
    if input_clamp is not None:
        logr_c = logr.clamp(min=-input_clamp, max=input_clamp)
        if iw is not None:
            iw = torch.where(logr == logr_c, iw, iw.detach())
        logr = logr_c
    kl = {"k1": -logr, "k2": torch.square(logr) / 2,
          "k3": torch.exp(logr) - 1 - logr}[kl_type]
    if iw is not None:
        kl = iw * kl
    if output_clamp is not None:
        kl = kl.clamp(min=-output_clamp, max=output_clamp)
    return kl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_nemo_rl_calculate_kl(dtype, kl_type, on_policy):
    """NeMo-RL's KL penalty (input clamp 20, output clamp 10, importance weights multiplied
    in before the output clamp and differentiated) with its global token normaliser:
    clamp_order="weighted", iw_grad=True, denominator=global_valid_toks."""
    logq, logp, m = _clamp_inputs(dtype, seed=4)
    rng = np.random.default_rng(9)
    gen = (logq + rng.normal(0.0, 0.4, logq.shape)).astype(dtype)  # generation log-probs
    toks = float(m.sum()) + 7.0  # this shard's tokens are part of a larger global batch

    def ref_fn(q, p, mt):
        if on_policy:
            iw = torch.nan_to_num(torch.exp(q - torch.tensor(gen)), nan=0.0, posinf=0.0,
                                  neginf=0.0)
        else:
            iw = torch.exp(q - q.detach())
        kl = nemo_calculate_kl(q, p, kl_type, 20.0, 10.0, iw)
        return torch.sum(kl * mt) / (toks + 1e-8)

    grad = _grad_check(dtype, (logq, logp, m), ref_fn, dict(
        estimator=kl_type, clamp_log_ratio=(-20, 20), clamp_value=(-10, 10),
        clamp_order="weighted", iw_grad=True, log_iw=(logq - gen) if on_policy else None,
        reduction="token-mean", denominator=toks))
    assert grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_bias_corrected_kl(dtype):
    """TRL use_bias_correction_kl: k3 times exp(logps - old_logps), differentiated through
    the importance weight, under the "grpo" aggregation: iw_grad=True."""
    logq, logp, m = _inputs(dtype)
    rng = np.random.default_rng(2)
    old = (logq + rng.normal(0.0, 0.3, logq.shape)).astype(dtype)

    def ref_fn(q, p, mt):
        d = p - q
        kl = (torch.exp(d) - d - 1) * torch.exp(q - torch.tensor(old))
        return trl_loss(kl, mt, "grpo")

    _grad_check(dtype, (logq, logp, m), ref_fn, dict(
        estimator="k3", log_iw=logq - old, iw_grad=True, **TRL_SETTINGS["grpo"]))
    # without iw_grad the gradient holds the weight fixed: it differs by w * t / N per token
    _, fixed = fastkl.kl_mc_grad(logq, logp, "k3", mask=m, log_iw=logq - old,
                                 **TRL_SETTINGS["grpo"])
    _, full = fastkl.kl_mc_grad(logq, logp, "k3", mask=m, log_iw=logq - old, iw_grad=True,
                                **TRL_SETTINGS["grpo"])
    assert not np.allclose(fixed, full)


@pytest.mark.parametrize("mode", ["low_var_kl", "low_var_kl+", "k1+"])
def test_verl_kl_penalty_bf16_through_fastkl_torch(mode):
    """bfloat16 log-probs (verl's usual dtype) through fastkl.torch.kl_mc: value and gradient
    of verl's formula evaluated in float64 on the same bf16 inputs, to bf16 rounding."""
    ft = pytest.importorskip("fastkl.torch")
    logq, logp, m = _clamp_inputs(np.float64, seed=6)
    q16 = torch.tensor(logq).to(torch.bfloat16).requires_grad_()
    p16 = torch.tensor(logp).to(torch.bfloat16)
    mt = torch.tensor(m)
    v = ft.kl_mc(q16, p16, mask=mt, reduction="token-mean", **{
        k: val for k, val in VERL_KL[mode].items() if k != "estimator"},
        estimator=VERL_KL[mode]["estimator"])
    v.backward()
    assert v.dtype == torch.bfloat16 and q16.grad.dtype == torch.bfloat16
    q64 = q16.detach().double().requires_grad_()
    ref = verl_agg_loss(verl_kl_penalty(q64, p16.double(), mode), mt.double(), "token-mean")
    ref.backward()
    np.testing.assert_allclose(float(v), ref.item(), rtol=1e-2)
    g, gref = q16.grad.double().numpy(), q64.grad.numpy()
    np.testing.assert_allclose(g, gref, rtol=1e-2, atol=1e-2 * np.abs(gref).max())


def openrlhf_approx_kl(log_probs, log_probs_base, kl_estimator):
    """OpenRLHF ``compute_approx_kl`` (the versions that clamp the output to +-10)."""
    log_ratio = log_probs - log_probs_base
    if kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio.clamp(min=-10, max=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_openrlhf_clamped_gradients(dtype, est):
    """OpenRLHF's clamped estimators under a token mean: the gradient is 0 where the output
    clamp bites (k2 and k3 on the |l| ~ 15-30 tail)."""
    inputs = _clamp_inputs(dtype, seed=5)
    grad = _grad_check(
        dtype, inputs,
        lambda q, p, m: (openrlhf_approx_kl(q, p, est) * m).sum() / m.sum(),
        dict(estimator=est, clamp_value=(-10, 10), reduction="token-mean"))
    if est != "k1":
        assert (grad[inputs[2]] == 0).sum() >= 3


# --------------------------------------------------------------------------- GKD / Liger gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_trl_gkd_generalized_jsd_gradients(dtype, beta, temperature):
    """TRL GKD's loss differentiated by torch w.r.t. the student and the teacher logits, vs
    ``jsd_logits_grad(teacher, student, beta, endpoints="kl", wrt="both")`` and vs the
    autograd of ``fastkl.torch.jsd_logits``."""
    import fastkl.torch as ft

    student, teacher, labels = _logits(dtype)
    s = torch.tensor(student, requires_grad=True)
    t = torch.tensor(teacher, requires_grad=True)
    ref, _ = gkd_generalized_jsd(s, t, torch.tensor(labels), beta, temperature)
    gs_ref, gt_ref = torch.autograd.grad(ref, (s, t))
    keep = labels != -100
    v, gt, gs = fastkl.jsd_logits_grad(teacher, student, beta, endpoints="kl", wrt="both",
                                       mask=keep, reduction="mean", temperature=temperature)
    np.testing.assert_allclose(v, ref.item(), **_ltol(dtype))
    np.testing.assert_allclose(gs, gs_ref.numpy(), **_ltol(dtype))
    np.testing.assert_allclose(gt, gt_ref.numpy(), **_ltol(dtype))
    s2 = torch.tensor(student, requires_grad=True)
    loss = ft.jsd_logits(torch.tensor(teacher), s2, beta, endpoints="kl",
                         mask=torch.tensor(keep), reduction="mean", temperature=temperature)
    (g2,) = torch.autograd.grad(loss, s2)
    assert loss.dtype == s2.dtype
    np.testing.assert_allclose(loss.item(), ref.item(), **_ltol(dtype))
    np.testing.assert_allclose(g2.numpy(), gs_ref.numpy(), **_ltol(dtype))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_gkd_bf16_gradient(beta):
    """GKD trains in bf16: fastkl.torch's bf16 loss and student gradient vs GKD's formula in
    float64 on the same (bf16-rounded) logits, within bf16 rounding."""
    import fastkl.torch as ft

    student, teacher, labels = _logits(np.float64)
    sb = torch.tensor(student).to(torch.bfloat16).requires_grad_()
    tb = torch.tensor(teacher).to(torch.bfloat16)
    s64 = sb.detach().double().requires_grad_()
    ref, _ = gkd_generalized_jsd(s64, tb.double(), torch.tensor(labels), beta)
    (gref,) = torch.autograd.grad(ref, s64)
    keep = torch.tensor(labels != -100)
    loss = ft.jsd_logits(tb, sb, beta, endpoints="kl", mask=keep, reduction="mean")
    (g,) = torch.autograd.grad(loss, sb)
    assert loss.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
    np.testing.assert_allclose(loss.double().item(), ref.item(), rtol=1e-2)
    scale = float(gref.abs().max())
    assert float((g.double() - gref).abs().max()) <= 1e-2 * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_jsd_gradients(dtype, beta):
    """Liger's JSD (on log-softmaxed inputs) differentiated through the log-softmax w.r.t.
    the student and teacher logits, vs ``jsd_logits_grad(..., empty=0.0)``; every label
    ignored: loss 0.0 and zero gradients in both."""
    student, teacher, labels = _logits(dtype)
    V = student.shape[-1]
    F = torch.nn.functional
    st = torch.tensor(student, requires_grad=True)
    te = torch.tensor(teacher, requires_grad=True)
    lab = torch.tensor(labels).reshape(-1)
    for lab_k in (lab, torch.full_like(lab, -100)):
        s = F.log_softmax(st, -1).reshape(-1, V)
        t = F.log_softmax(te, -1).reshape(-1, V)
        ref = liger_jsd(s, t, lab_k, beta)
        keep = (lab_k != -100).numpy().reshape(labels.shape)
        v, gt, gs = fastkl.jsd_logits_grad(teacher, student, beta, endpoints="kl", wrt="both",
                                           mask=keep, reduction="mean", empty=0.0)
        np.testing.assert_allclose(v, ref.item(), **_ltol(dtype))
        if ref.requires_grad:
            gs_ref, gt_ref = torch.autograd.grad(ref, (st, te))
            np.testing.assert_allclose(gs, gs_ref.numpy(), **_ltol(dtype))
            np.testing.assert_allclose(gt, gt_ref.numpy(), **_ltol(dtype))
        else:  # Liger's constant 0.0: no gradient reaches the logits
            assert v == 0.0 and not gs.any() and not gt.any()


# --------------------------------------------------------------------------- torch losses


def verl_entropy_from_logits(logits):
    """verl ``entropy_from_logits``: logsumexp(logits) - sum(softmax(logits) * logits)."""
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def selective_log_softmax(logits, index):
    """TRL ``selective_log_softmax`` / verl ``logprobs_from_logits``: log_softmax gathered."""
    return torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)


def _torch_logits(dtype, seed=4):
    student, teacher, labels = _logits(dtype, seed=seed)
    mask = labels != -100
    return (torch.tensor(student, requires_grad=True), torch.tensor(teacher), labels,
            torch.tensor(mask))


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_entropy_token_mean_torch(dtype):
    import fastkl.torch as ft

    s, _, _, mask = _torch_logits(dtype)
    ent = verl_entropy_from_logits(s)
    ref = verl_agg_loss(ent, mask.to(ent.dtype), "token-mean")
    (gref,) = torch.autograd.grad(ref, s)
    s2 = s.detach().clone().requires_grad_()
    v = ft.entropy_logits(s2, mask=mask, reduction="mean")
    (g,) = torch.autograd.grad(v, s2)
    np.testing.assert_allclose(v.item(), ref.item(), **_ltol(dtype))
    np.testing.assert_allclose(g.numpy(), gref.numpy(), **_ltol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_torch(dtype, temperature):
    import fastkl.torch as ft

    s, _, labels, _ = _torch_logits(dtype)
    lab = torch.tensor(labels).clamp(min=0)  # TRL gathers real token ids
    ref = selective_log_softmax(s / temperature, lab)
    go = torch.linspace(-1.0, 2.0, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    (gref,) = torch.autograd.grad(ref, s, go)
    s2 = s.detach().clone().requires_grad_()
    v = ft.token_logprobs(s2, lab, temperature=temperature)
    (g,) = torch.autograd.grad(v, s2, go)
    np.testing.assert_allclose(v.detach().numpy(), ref.detach().numpy(), **_ltol(dtype))
    np.testing.assert_allclose(g.numpy(), gref.numpy(), **_ltol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_distillation_torch(dtype, temperature):
    """``kl_div(log_softmax(student/T), log_softmax(teacher/T), log_target=True)`` summed
    over the vocabulary, masked mean over tokens; gradients to student and teacher."""
    import fastkl.torch as ft

    F = torch.nn.functional
    s, t, _, mask = _torch_logits(dtype)
    t = t.clone().requires_grad_()
    per = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                   reduction="none", log_target=True).sum(-1)
    ref = per[mask].sum() / mask.sum()
    gs_ref, gt_ref = torch.autograd.grad(ref, (s, t))
    s2 = s.detach().clone().requires_grad_()
    t2 = t.detach().clone().requires_grad_()
    v = ft.kl_logits(t2, s2, temperature=temperature, mask=mask, reduction="mean")
    gt, gs = torch.autograd.grad(v, (t2, s2))
    np.testing.assert_allclose(v.item(), ref.item(), **_ltol(dtype))
    np.testing.assert_allclose(gs.numpy(), gs_ref.numpy(), **_ltol(dtype))
    np.testing.assert_allclose(gt.numpy(), gt_ref.numpy(), **_ltol(dtype))
