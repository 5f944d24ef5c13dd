"""Command line: ``fastkl demo`` (also ``python -m fastkl demo``), ``fastkl backends``,
``fastkl mc LOGQ LOGP`` (Monte Carlo KL from files) and ``fastkl compare BASE TEST``
(llama.cpp-style report between two logit files).

``fastkl demo`` reproduces J. Schulman's "Approximating KL Divergence" (2020) experiment:
x ~ q = N(0, 1), p = N(mu, 1) for mu = 0.1 and 1, and reports bias/true and stdev/true of
the k1, k2, k3 estimators of KL(q||p) and of reverse k3 for KL(p||q) beside their closed
forms, then one throughput line per available backend against the numpy textbook formula.

Closed forms (unit-variance Gaussians, l = log p(x) - log q(x) = mu*x - mu**2/2 with
x ~ N(0, 1), so l ~ N(-mu**2/2, mu**2) and KL(q||p) = KL(p||q) = mu**2/2):

* k1 = -l: unbiased, sd = mu, so sd/true = 2/mu.
* k2 = l**2/2: E = mu**2/2 + mu**4/8, so bias/true = mu**2/4; sd/true = sqrt(2 + mu**2).
* k3 = (r - 1) - l: unbiased, sd/true = 2 sqrt(e^{mu^2} - 1 - mu^2) / mu**2.
* reverse k3 = r*l - (r - 1) = r(l - 1) + 1: unbiased, since E_q[r g(l)] = E_p[g(l)] and
  E_p[l] = KL(p||q). For the second moment, e^{2l} tilts N(m, s^2) (m = -s^2/2, s^2 = mu^2)
  to N(m + 2 s^2, s^2) = N(3 mu^2/2, mu^2) with factor e^{2m + 2s^2} = e^{mu^2}:
  E_q[t^2] = e^{mu^2} ((3 mu^2/2 - 1)^2 + mu^2) + 2 (mu^2/2 - 1) + 1, so
  Var = e^{mu^2} ((3 mu^2/2 - 1)^2 + mu^2) + mu^2 - 1 - mu^4/4  (-> mu^4/2 as mu -> 0, the
  same sqrt(2) as k3). Without cancellation: Var = (e^{mu^2} - 1 - mu^2) a + 9 mu^6/4,
  a = 1 - 2 mu^2 + 9 mu^4/4 > 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# (label, estimator, reverse, target)
_ESTIMATORS = (
    ("k1", "k1", False, "KL(q||p)"),
    ("k2", "k2", False, "KL(q||p)"),
    ("k3", "k3", False, "KL(q||p)"),
    ("reverse k3", "k3", True, "KL(p||q)"),
)

TEXTBOOK = "l = logp - logq; np.mean(np.exp(l) - 1 - l)"


def closed_form(label: str, mu: float) -> tuple[float, float]:
    """(bias/true, stdev/true) of an estimator for q = N(0,1), p = N(mu,1)."""
    m2 = mu * mu
    true = m2 / 2.0
    if label == "k1":
        return 0.0, 2.0 / mu
    if label == "k2":
        return m2 / 4.0, math.sqrt(2.0 + m2)
    if label == "k3":
        # expm1(m2) - m2 without cancellation for small mu
        return 0.0, 2.0 * math.sqrt(_expm1_minus_x(m2)) / m2
    if label == "reverse k3":
        # Var = e^{m2} a + m2 - 1 - m2^2/4 with a = (3 m2/2 - 1)^2 + m2 = 1 - 2 m2 + 9 m2^2/4
        # (a > 0 always); with e^{m2} = 1 + m2 + E(m2), E(x) = e^x - 1 - x, this is
        # Var = E(m2) a + 9 m2^3 / 4: a sum of positive terms, no cancellation
        a = 1.0 - 2.0 * m2 + 2.25 * m2 * m2
        var = _expm1_minus_x(m2) * a + 2.25 * m2**3
        return 0.0, math.sqrt(var) / true
    raise ValueError(label)


def _expm1_minus_x(x: float) -> float:
    if abs(x) < 1e-2:
        return x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return math.expm1(x) - x


def gaussian_samples(mu: float, n: int, rng: np.random.Generator):
    """x ~ N(0,1); (log q(x), log p(x)) as float64 for q = N(0,1), p = N(mu,1)."""
    x = rng.standard_normal(n)
    logq = -0.5 * x * x - _LOG_SQRT_2PI
    d = x - mu
    logp = -0.5 * d * d - _LOG_SQRT_2PI
    return logq, logp


def _best_time(fn, repeats: int, budget_s: float = 2.0):
    """Best wall time of up to ``repeats`` calls (at least 2), stopping once ``budget_s`` is
    spent; returns (best seconds, last result)."""
    best, spent, res = math.inf, 0.0, None
    for i in range(max(repeats, 2)):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if i >= 1 and spent > budget_s:
            break
    return best, res


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:9.1f} ms" if s < 10 else f"{s:9.2f} s "


def _textbook_k3(logq, logp):
    l = logp - logq
    return float(np.mean(np.exp(l) - 1 - l))


def _table(mu: float, n: int, stats_backend: str | None, rng):
    import fastkl

    true = mu * mu / 2.0
    logq, logp = gaussian_samples(mu, n, rng)
    lines = [
        f"mu = {mu:g}    true KL(q||p) = KL(p||q) = mu^2/2 = {true:g}",
        f"  {'estimator':<11} {'estimates':<9} | {'bias/true':>9} {'± 95%':>8} "
        f"{'closed':>8} | {'stdev/true':>10} {'closed':>8}",
        "  " + "-" * 11 + " " + "-" * 9 + "-+-" + "-" * 27 + "-+-" + "-" * 19,
    ]
    for label, est, rev, target in _ESTIMATORS:
        st = fastkl.kl_mc_stats(logq, logp, est, reverse=rev, backend=stats_backend)
        bias = (st.mean - true) / true
        ci = 1.959963984540054 * st.sem / true
        cb, cs = closed_form(label, mu)
        lines.append(
            f"  {label:<11} {target:<9} | {bias:>+9.4f} {ci:>8.4f} {cb:>8.4f} | "
            f"{st.std / true:>10.4f} {cs:>8.4f}"
        )
    return lines, (logq, logp)


def _throughput(logq64, logp64, backends, first_calls, repeats) -> list[str]:
    import fastkl

    logq = logq64.astype(np.float32)
    logp = logp64.astype(np.float32)
    n = logq.size
    nbytes = logq.nbytes + logp.nbytes
    t_np, ref = _best_time(lambda: _textbook_k3(logq, logp), repeats)
    exact = fastkl.kl_mc(logq, logp, "k3", backend="numpy")  # float64 reference value
    lines = [
        f"Throughput: kl_mc(logq, logp, \"k3\") over {n:,} float32 pairs "
        f"({nbytes / 1e6:.0f} MB of input), best of up to {max(repeats, 2)} calls",
        f"  {'implementation':<16} {'first call':>12} {'best':>12} {'GB/s':>7} "
        f"{'vs numpy':>9}  {'rel. err of mean':>16}",
        f"  {'numpy textbook':<16} {'':>12} {_fmt_ms(t_np):>12} "
        f"{nbytes / t_np / 1e9:>7.2f} {1.0:>8.2f}x  {abs(ref - exact) / exact:>16.1e}",
    ]
    for name in backends:
        t, val = _best_time(
            lambda name=name: fastkl.kl_mc(logq, logp, "k3", backend=name), repeats
        )
        lines.append(
            f"  {'fastkl ' + name:<16} {_fmt_ms(first_calls[name]):>12} {_fmt_ms(t):>12} "
            f"{nbytes / t / 1e9:>7.2f} {t_np / t:>8.2f}x  {abs(val - exact) / exact:>16.1e}"
        )
    lines.append(f"  numpy textbook = {TEXTBOOK} (float32)")
    lines.append(
        "  first call = the first kl_mc call in this process (1,000 pairs, float32): JIT "
        "compile / extension load"
    )
    return lines


def load_warning() -> str | None:
    """A line to print when the machine is busy (timings of threaded kernels then measure the
    scheduler more than the kernel), else None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"warning: load average {load:.1f} on {cores} cores: other processes compete "
                "for the CPU, so the timings (of multi-threaded kernels above all) are noisy")
    return None


def _parse_backends(spec: str | None) -> list[str]:
    import fastkl

    avail = fastkl.available_backends()
    if spec is None:
        return avail
    names = [s.strip() for s in spec.split(",") if s.strip()]
    from fastkl.backends import BACKEND_NAMES, get_backend

    for name in names:
        if name not in BACKEND_NAMES:
            raise ValueError(f"--backend: unknown backend {name!r} (choose from "
                             f"{', '.join(BACKEND_NAMES)})")
        get_backend(name)  # raises ValueError naming why it is unavailable
    return names


_MAX_SAMPLES = 10**9  # two float64 arrays and their temporaries: ~50 GB beyond this


def _samples(text: str) -> int:
    """``--samples``: a whole number in [2, 1e9] written as an int or a float (1e7)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v == int(v) and 2 <= v <= _MAX_SAMPLES):
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 2 to {_MAX_SAMPLES:.0e}, got {text!r}")
    return int(v)


def _int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text!r}")
        return v

    return parse


def _shown(path) -> str:
    """A file name safe to print on any stdout: as given when it encodes, else its repr with
    the undecodable bytes escaped."""
    s = os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        s.encode(enc)
        return s
    except (UnicodeEncodeError, LookupError):
        return ascii(s)


def cmd_demo(args) -> int:
    import fastkl

    n = int(args.samples)  # checked by _samples: 2 <= n <= 1e9
    backends = _parse_backends(args.backend)  # a ValueError is main's one-line error
    if not backends:
        raise ValueError("--backend: no backend selected")
    out = sys.stdout
    t_start = time.perf_counter()

    # first calls before anything else touches a backend, so compile time is visible
    tiny = np.random.default_rng(12345).standard_normal((2, 1000)).astype(np.float32)
    first_calls = {}
    for name in backends:
        t0 = time.perf_counter()
        fastkl.kl_mc(tiny[0], tiny[1], "k3", backend=name)
        first_calls[name] = time.perf_counter() - t0

    stats_backend = backends[0]
    print(f"fastkl {fastkl.__version__} demo: J. Schulman, \"Approximating KL Divergence\" "
          "(2020)", file=out)
    print(f"x ~ q = N(0,1), p = N(mu,1); {n:,} samples per mu, seed {args.seed}; "
          f"kl_mc_stats(backend={stats_backend!r}) on float64 log-densities", file=out)
    print("k1 = -l, k2 = l^2/2, k3 = (r-1) - l estimate KL(q||p); reverse k3 = r*l - (r-1) "
          "estimates KL(p||q); l = logp - logq, r = e^l", file=out)
    print("bias/true = (mean - true)/true with its 95% interval; closed = exact value for "
          "these Gaussians", file=out)
    rng = np.random.default_rng(args.seed)
    data = None
    for mu in (0.1, 1.0):
        print(file=out)
        lines, data = _table(mu, n, stats_backend, rng)
        print("\n".join(lines), file=out)
    out.flush()
    if not args.no_bench:
        print(file=out)
        warn = load_warning()
        if warn:
            print(warn, file=out)
        print("\n".join(_throughput(data[0], data[1], backends, first_calls, args.repeats)),
              file=out)
    print(file=out)
    print(f"total {time.perf_counter() - t_start:.1f} s", file=out)
    return 0


def cmd_warmup(args) -> int:
    from fastkl.warmup import warmup

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    names = _parse_backends(args.backend) if args.backend else None
    t0 = time.perf_counter()
    times = warmup(dtypes, names, progress=False if args.no_progress else None)
    for key, secs in times.items():
        print(f"{key:<16} {secs:7.2f} s")
    print(f"warm: every kernel family compiled or loaded in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_backends(args) -> int:
    import fastkl
    from fastkl.backends import _errors, _try_load

    avail = fastkl.available_backends()
    for name in ("cython", "numba", "numpy"):
        if name in avail:
            mod = _try_load(name)
            print(f"{name:<7} available   ({mod.__name__})")
        else:
            print(f"{name:<7} unavailable ({_errors.get(name, 'unknown reason')})")
    return 0


# --------------------------------------------------------------------------- mc / compare

_MC_EXAMPLES = """examples:
  fastkl mc logq.npy logp.npy                      # k3 estimate of KL(q||p) with its error bar
  fastkl mc logq.npy logp.npy --estimator k1 --reverse --json
  fastkl mc policy.npy ref.npy --mask mask.npy --reduction seq-mean-token-mean \\
      --clamp-log-ratio -20 20 --clamp-value -10 10

LOGQ and LOGP are .npy files of the same shape (log q(x), log p(x) of samples x ~ q; also
.npz / .safetensors, FILE::NAME picks an array); streamed in blocks, so they may be larger
than memory. JSON keys: mean, sem, n, ci95 (and std, value, sum, weight, n_nan)."""

_COMPARE_EXAMPLES = """examples:
  fastkl compare base.npy quant.npy                 # KLD statistics, same top-1 rate
  fastkl compare base.npy quant.npy --tokens tokens.npy --plot kld.png
  fastkl compare wiki.kld quant_logits.npy          # a llama.cpp --kl-divergence-base file
  fastkl compare base.safetensors test.npz --temperature 2 --json

BASE and TEST hold logits [rows, vocab] (any leading shape, vocabulary last): .npy, .npz,
.safetensors (FILE::NAME picks a tensor) or llama.cpp --kl-divergence-base files. Prints the
statistics of llama-perplexity --kl-divergence with its labels; with tokens (--tokens, or
those of a llama.cpp base file) also perplexities and the probability of the observed token.
With a llama.cpp base file and the test model's logits it prints llama.cpp's per-chunk
table and report in llama.cpp's own arithmetic (docs/llama_compat.md)."""


def _json_ready(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.generic):
        return _json_ready(x.item())
    return x


def _fail(cmd: str, exc: BaseException) -> int:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError):
        msg = f"out of memory{': ' + msg if msg != 'MemoryError' else ''}"
    line = f"fastkl {cmd}: error: {msg}"
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    try:  # a file name with undecodable bytes must not turn the message into a traceback
        line.encode(enc)
    except (UnicodeEncodeError, LookupError):
        line = line.encode(enc, "backslashreplace").decode(enc, "replace")
    print(line, file=sys.stderr)
    return 1


def cmd_mc(args) -> int:
    import json

    import fastkl

    try:
        rep = fastkl.kl_mc_file(
            args.logq, args.logp, args.estimator, reverse=args.reverse,
            reduction=args.reduction, mask=args.mask, log_iw=args.log_iw,
            clamp_log_ratio=args.clamp_log_ratio, clamp_value=args.clamp_value,
            nan_policy=args.nan_policy, backend=args.backend,
            memory_limit=args.memory_limit * 2**20,
        )
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        return _fail("mc", exc)
    if args.json:
        print(json.dumps(_json_ready(rep.to_dict())))
        return 0
    target = "KL(p||q)" if args.reverse else "KL(q||p)"
    print(f"fastkl mc: {args.estimator} estimate of {target} from {rep.n:,} samples "
          f"({_shown(args.logq)}, {_shown(args.logp)})")
    print(f"Mean    KL: {rep.mean:10.6f} ± {rep.sem:10.6f}")
    print(f"95% CI    : [{rep.ci95[0]:.6f}, {rep.ci95[1]:.6f}]")
    print(f"Std dev   : {rep.std:10.6f}")
    print(f"n         : {rep.n}")
    if args.reduction not in ("mean", "token-mean"):
        print(f"{args.reduction}: {rep.value:.6f}")
    if rep.n_nan:
        print(f"NaN terms : {rep.n_nan} ({args.nan_policy})")
    return 0


def _compare_lines(rep, label: str) -> list[str]:
    """The report as llama-perplexity --kl-divergence prints its final statistics (the same
    lines, order and printf formats), after one fastkl header line."""
    out = [f"fastkl compare: {rep.extra.get('base')} vs {rep.extra.get('test')}: "
           f"{rep.n:,} rows x {rep.extra.get('vocab')} vocab, temperature "
           f"{rep.extra.get('temperature'):g}; percentiles "
           f"{'exact' if rep.percentiles_exact else 'from a sketch (within 0.1%)'}"
           f"{'; llama.cpp arithmetic' if rep.llama_compat else ''}", ""]
    if rep.chunks and rep.n_tokens:  # llama.cpp's running per-chunk table
        out.append("chunk             PPL               ln(PPL(Q)/PPL(base))          "
                   "KL Divergence              Δp RMS            Same top p")
        for i, c in enumerate(rep.chunks, 1):
            out.append(f"{i:4d}    {c['ppl']:9.4f} ± {c['ppl_sem']:9.4f}"
                       f"    {c['ln_ppl_ratio']:10.5f} ± {c['ln_ppl_ratio_sem']:10.5f}"
                       f"    {c['kld']:10.5f} ± {c['kld_sem']:10.5f}"
                       f"    {100 * c['rms_dp']:6.3f} ± {100 * c['rms_dp_sem']:6.3f} %"
                       f"    {100 * c['same_top']:6.3f} ± {100 * c['same_top_sem']:6.3f} %")
        out.append("")
    if rep.n_tokens:
        out += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {rep.ppl_test:10.6f} ± {rep.ppl_test_sem:10.6f}",
            f"Mean PPL(base)                : {rep.ppl_base:10.6f} ± {rep.ppl_base_sem:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * rep.cor_ln_ppl:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {rep.ln_ppl_ratio:10.6f} ± "
            f"{rep.ln_ppl_ratio_sem:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {rep.ppl_ratio:10.6f} ± {rep.ppl_ratio_sem:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {rep.ppl_diff:10.6f} ± {rep.ppl_diff_sem:10.6f}",
            "",
        ]
    name = {"KLD": "KL divergence", "JSD": "JS divergence", "H": "entropy"}[label]
    out.append(f"====== {name} statistics ======")
    out.append(f"{'Mean':<8}{label}: {rep.mean:10.6f} ± {rep.sem:10.6f}")
    out.append(f"Maximum {label}: {rep.maximum:10.6f}")
    for p, v in rep.percentiles.items():
        head = "Median  " if p == 50.0 else f"{p:4.1f}%   "
        out.append(f"{head}{label}: {v:10.6f}")
    out.append(f"Minimum {label}: {rep.minimum:10.6f}")
    same = f"Same top p: {100 * rep.same_top:6.3f} ± {100 * rep.same_top_sem:5.3f} %"
    if not rep.n_tokens:
        out.append(same)
        return out
    out += ["", "====== Token probability statistics ======",
            f"Mean    Δp: {100 * rep.dp_mean:6.3f} ± {100 * rep.dp_sem:5.3f} %",
            f"Maximum Δp: {100 * rep.dp_maximum:6.3f}%"]
    for p, v in rep.dp_percentiles.items():
        head = "Median  " if p == 50.0 else f"{p:4.1f}%   "
        out.append(f"{head}Δp: {100 * v:6.3f}%")
    out += [f"Minimum Δp: {100 * rep.dp_minimum:6.3f}%",
            f"RMS Δp    : {100 * rep.rms_dp:6.3f} ± {100 * rep.rms_dp_sem:5.3f} %", same]
    return out


def _plot(rep, path: str, label: str) -> None:
    """KLD histogram (log x axis) and, with tokens, a Δp histogram; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 2 if rep.n_tokens else 1
    fig, axes = plt.subplots(1, ncol, figsize=(6 * ncol, 4), squeeze=False)
    vals, cnts = rep.histograms["values"]
    pos = vals > 0
    ax = axes[0, 0]
    if pos.any():
        lo, hi = vals[pos].min(), vals[pos].max()
        bins = np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 10, 81)
        ax.hist(vals[pos], bins=bins, weights=cnts[pos], color="C0")
        ax.set_xscale("log")
    nzero = int(cnts[~pos].sum())
    ax.set_xlabel(f"{label} per row (nats)")
    ax.set_ylabel("rows")
    ax.set_title(f"{label}: mean {rep.mean:.4g}, median {rep.percentiles[50.0]:.4g}"
                 + (f" ({nzero} rows at 0)" if nzero else ""))
    if rep.n_tokens:
        dv, dc = rep.histograms["dp"]
        ax = axes[0, 1]
        lo, hi = (float(dv.min()), float(dv.max())) if dv.size else (-1.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 1e-3, hi + 1e-3
        ax.hist(dv, bins=np.linspace(lo, hi, 101), weights=dc, color="C1")
        ax.set_yscale("log")
        ax.set_xlabel("Δp = p_test(token) - p_base(token)")
        ax.set_ylabel("tokens")
        ax.set_title(f"Δp: mean {rep.dp_mean:.3g}, RMS {rep.rms_dp:.3g}")
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _plot_target_problem(path: str) -> str | None:
    """Why ``--plot PATH`` cannot be written (None when it can): checked up front."""
    if not path:
        return "empty file name"
    full = os.path.abspath(path)
    if os.path.isdir(full) or path.endswith(os.sep):
        return "is a directory, not a file name"
    if os.path.lexists(full):
        if not os.path.isfile(full):
            return "exists and is not a regular file"
        if not os.access(full, os.W_OK):
            return "exists and is not writable"
    d = os.path.dirname(full)
    if not os.path.isdir(d):
        return f"directory {d} does not exist"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"directory {d} is not writable"
    return None


def cmd_compare(args) -> int:
    import json

    import fastkl

    if args.plot is not None:
        problem = _plot_target_problem(args.plot)
        if problem:  # checked before the (possibly long) computation, not after it
            return _fail("compare",
                         ValueError(f"--plot {args.plot}: cannot write there: {problem}"))
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fastkl compare: error: --plot needs matplotlib (pip install 'fastkl[plot]')",
                  file=sys.stderr)
            return 1
    exact = {"auto": "auto", "exact": True, "sketch": False}[args.percentiles]
    try:
        rep = fastkl.compare_logits(
            args.base, args.test, tokens=args.tokens, temperature=args.temperature, op=args.op,
            beta=args.beta, exact_percentiles=exact, backend=args.backend,
            memory_limit=args.memory_limit * 2**20,
        )
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        return _fail("compare", exc)
    label = {"kl": "KLD", "jsd": "JSD", "entropy": "H"}[args.op]
    if args.plot is not None:
        try:
            _plot(rep, args.plot, label)
        except (OSError, ValueError) as exc:
            return _fail("compare", exc)
    if args.json:
        print(json.dumps(_json_ready(rep.to_dict())))
    else:
        print("\n".join(_compare_lines(rep, label)))
    return 0


def _add_common(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--backend", default=None, help="cython, numba or numpy (default: fastest)")
    p.add_argument("--memory-limit", type=float, default=256, metavar="MB",
                   help="target peak resident memory in MiB (default: 256)")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line ``fastkl CMD: error: ...`` (exit status 2);
    subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import fastkl

    parser = _Parser(
        prog="fastkl",
        description="fastkl: fast, accurate KL divergence Monte Carlo estimators.",
        epilog="commands: demo, backends, warmup, mc, compare (fastkl COMMAND --help for examples)",
    )
    parser.add_argument("--version", action="version", version=f"fastkl {fastkl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="reproduce Schulman's 'Approximating KL Divergence' table and time the backends",
        description="Reproduce Schulman's experiment (q = N(0,1), p = N(0.1,1) and N(1,1)): "
        "bias and stdev of k1, k2, k3 and reverse k3 beside their closed forms, then one "
        "throughput line per backend against the numpy textbook formula.",
    )
    demo.add_argument("--samples", type=_samples, default=10**7,
                      help="samples per mu (default: 1e7)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0,
                      help="random seed >= 0 (default: 0)")
    demo.add_argument("--backend", default=None,
                      help="backend(s) to use, comma-separated (default: all available; "
                      "the first one computes the table)")
    demo.add_argument("--repeats", type=_int_at_least(1), default=5,
                      help="timed calls per implementation, best reported (default: 5)")
    demo.add_argument("--no-bench", action="store_true", help="skip the throughput lines")
    demo.set_defaults(func=cmd_demo)
    be = sub.add_parser("backends", help="list the backends and whether they work here")
    be.set_defaults(func=cmd_backends)
    wu = sub.add_parser(
        "warmup",
        help="compile every numba kernel once, into numba's on-disk cache",
        description="Compile (or load) every numba kernel family for the given dtypes, so "
        "that later processes find them in numba's on-disk cache and their first calls are "
        "fast. Run it once after installing or upgrading fastkl (or numba), e.g. in a "
        "container build step; not needed for the Cython backend.",
    )
    wu.add_argument("--dtypes", default="float32,float64",
                    help="comma-separated float dtypes (default: float32,float64)")
    wu.add_argument("--backend", default=None,
                    help="backend(s), comma-separated (default: every compiled backend here)")
    wu.add_argument("--no-progress", action="store_true", help="no progress bar")
    wu.set_defaults(func=cmd_warmup)

    raw = argparse.RawDescriptionHelpFormatter
    mc = sub.add_parser(
        "mc", help="Monte Carlo KL estimate with its error bar from two .npy files",
        description="Monte Carlo estimate of KL(q||p) (or KL(p||q) with --reverse) from "
        "log-densities of samples x ~ q, streamed from files in bounded memory.",
        epilog=_MC_EXAMPLES, formatter_class=raw,
    )
    mc.add_argument("logq", metavar="LOGQ", help="log q(x) of the samples (.npy)")
    mc.add_argument("logp", metavar="LOGP", help="log p(x) of the same samples (.npy)")
    mc.add_argument("--estimator", default="k3", choices=("k1", "k2", "k3"),
                    help="k1 = -l, k2 = l^2/2, k3 = (r-1) - l (default: k3)")
    mc.add_argument("--reverse", action="store_true", help="estimate KL(p||q) (k1, k3)")
    mc.add_argument("--mask", metavar="M", default=None,
                    help="bool or weight array of the same shape (.npy)")
    mc.add_argument("--log-iw", metavar="W", default=None,
                    help="log importance weights log q(x) - log mu(x) (.npy)")
    mc.add_argument("--reduction", default="mean",
                    choices=("mean", "sum", "token-mean", "seq-mean-token-mean",
                             "seq-mean-token-sum"), help="value reported besides the mean")
    mc.add_argument("--clamp-log-ratio", type=float, nargs=2, metavar=("LO", "HI"))
    mc.add_argument("--clamp-value", type=float, nargs=2, metavar=("LO", "HI"))
    mc.add_argument("--nan-policy", default="propagate", choices=("propagate", "omit", "raise"))
    _add_common(mc)
    mc.set_defaults(func=cmd_mc)

    cmp_ = sub.add_parser(
        "compare", help="llama.cpp-style KL divergence report between two logit files",
        description="Compare the next-token distributions of a base and a test model row by "
        "row (KL(P_base || P_test), top-1 agreement, and with tokens Δp and perplexities), "
        "streaming both files in bounded memory.",
        epilog=_COMPARE_EXAMPLES, formatter_class=raw,
    )
    cmp_.add_argument("base", metavar="BASE", help="base model logits (or llama.cpp .kld file)")
    cmp_.add_argument("test", metavar="TEST", help="test model logits")
    cmp_.add_argument("--tokens", metavar="T", default=None,
                      help="observed next token per row (.npy of ints)")
    cmp_.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    cmp_.add_argument("--op", default="kl", choices=("kl", "jsd", "entropy"),
                      help="per-row statistic: KL(P||Q), JSD_beta(P,Q) or H(P) (default: kl)")
    cmp_.add_argument("--beta", type=float, default=0.5, help="JSD beta (default: 0.5)")
    cmp_.add_argument("--percentiles", default="auto", choices=("auto", "exact", "sketch"),
                      help="exact (8 bytes per row kept) or a 0.1%%-accurate sketch "
                      "(default: exact when it fits in an eighth of the memory limit)")
    cmp_.add_argument("--plot", metavar="FILE.png", default=None,
                      help="write a KLD (log axis) and Δp histogram (needs matplotlib)")
    _add_common(cmp_)
    cmp_.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors are one line ``fastkl CMD: error: ...`` on stderr and a
    non-zero exit status (argparse's usage errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # file names with undecodable bytes (surrogate escapes) print escaped, never raise
    out = sys.stdout
    old = getattr(out, "errors", None)
    reconf = getattr(out, "reconfigure", None)
    if reconf is not None and old == "strict":
        try:
            reconf(errors="backslashreplace")
        except (ValueError, OSError, TypeError):
            reconf = None
    else:
        reconf = None
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `fastkl ... | head`: stop quietly, as other tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        return _fail(args.command, exc)
    finally:
        if reconf is not None:
            try:
                reconf(errors=old)
            except (ValueError, OSError, TypeError):
                pass


if __name__ == "__main__":
    sys.exit(main())
