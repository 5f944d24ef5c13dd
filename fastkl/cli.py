"""Command line: ``fastkl demo`` (also ``python -m fastkl demo``), ``fastkl backends``,
``fastkl warmup``, ``fastkl mc LOGQ LOGP`` (Monte Carlo KL from files) and
``fastkl compare BASE TEST`` (llama.cpp-style report between two logit files).

The demo itself (Schulman's experiment and its closed forms) is in ``fastkl._demo``. Every
error is one line ``fastkl CMD: error: ...`` on stderr: ``main`` turns the exceptions a bad
input raises into it, so the commands just raise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

from ._estimators import BY_KEY, NAMES, REVERSIBLE

# the exceptions a bad argument or file raises: one line on stderr and exit status 1
_USER_ERRORS = (ValueError, TypeError, OSError, MemoryError)


# --------------------------------------------------------------------------- argument types

_MAX_SAMPLES = 10**9  # two float64 arrays and their temporaries: ~50 GB beyond this


def _convert(text: str, kind, what: str):
    """``kind(text)``, or argparse's error naming ``what`` was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _samples(text: str) -> int:
    """``--samples``: a whole number in [2, 1e9] written as an int or a float (1e7)."""
    v = _convert(text, float, "a number")
    if not (math.isfinite(v) and v == int(v) and 2 <= v <= _MAX_SAMPLES):
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 2 to {_MAX_SAMPLES:.0e}, got {text!r}")
    return int(v)


def _int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        v = _convert(text, int, "an integer")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text!r}")
        return v

    return parse


def _parse_backends(spec: str | None) -> list[str]:
    """``--backend a,b``: the named backends, each checked to load here (default: all that
    do, fastest first)."""
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


# --------------------------------------------------------------------------- output helpers


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


def _print_json(rep) -> None:
    """A report as one JSON object (non-finite numbers as null)."""
    print(json.dumps(_json_ready(rep.to_dict())))


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


# ----------------------------------------------------------------------- demo, backends, warmup


def cmd_demo(args) -> int:
    from ._demo import run

    backends = _parse_backends(args.backend)  # a ValueError is main's one-line error
    if not backends:
        raise ValueError("--backend: no backend selected")
    # args.samples is checked by _samples: 2 <= n <= 1e9
    return run(int(args.samples), args.seed, backends, args.repeats, bench=not args.no_bench)


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


# --------------------------------------------------------------------------- mc

_MC_EXAMPLES = """examples:
  fastkl mc logq.npy logp.npy                      # k3 estimate of KL(q||p) with its error bar
  fastkl mc logq.npy logp.npy --estimator k1 --reverse --json
  fastkl mc policy.npy ref.npy --mask mask.npy --reduction seq-mean-token-mean \\
      --clamp-log-ratio -20 20 --clamp-value -10 10

LOGQ and LOGP are .npy files of the same shape (log q(x), log p(x) of samples x ~ q; also
.npz / .safetensors, FILE::NAME picks an array); streamed in blocks, so they may be larger
than memory. JSON keys: mean, sem, n, ci95 (and std, value, sum, weight, n_nan)."""
_MC_FILES = {"LOGQ": "log q(x) of the samples (.npy)",
             "LOGP": "log p(x) of the same samples (.npy)"}


def cmd_mc(args) -> int:
    import fastkl

    rep = fastkl.kl_mc_file(
        args.logq, args.logp, args.estimator, reverse=args.reverse,
        reduction=args.reduction, mask=args.mask, log_iw=args.log_iw,
        clamp_log_ratio=args.clamp_log_ratio, clamp_value=args.clamp_value,
        clamp_order=args.clamp_order, norm=args.norm, empty_rows=args.empty_rows,
        empty=args.empty, denominator=args.denominator,
        nan_policy=args.nan_policy, backend=args.backend,
        memory_limit=args.memory_limit * 2**20,
    )
    if args.json:
        _print_json(rep)
        return 0
    target = BY_KEY[(args.estimator, args.reverse)].target
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


# --------------------------------------------------------------------------- compare

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
_COMPARE_FILES = {"BASE": "base model logits (or llama.cpp .kld file)",
                  "TEST": "test model logits"}

_STAT_LABEL = {"kl": "KLD", "jsd": "JSD", "entropy": "H"}  # --op: llama.cpp-style label
_STAT_NAME = {"KLD": "KL divergence", "JSD": "JS divergence", "H": "entropy"}


def _spread_lines(label: str, maximum, percentiles: dict, minimum, fmt) -> list[str]:
    """llama.cpp's ``Maximum``, percentile (``Median`` at 50) and ``Minimum`` lines of one
    statistic, each value written by ``fmt``."""
    heads = [("Maximum ", maximum)]
    heads += [("Median  " if p == 50.0 else f"{p:4.1f}%   ", v) for p, v in percentiles.items()]
    heads.append(("Minimum ", minimum))
    return [f"{head}{label}: {fmt(v)}" for head, v in heads]


def _header_line(rep) -> str:
    return (f"fastkl compare: {rep.extra.get('base')} vs {rep.extra.get('test')}: "
            f"{rep.n:,} rows x {rep.extra.get('vocab')} vocab, temperature "
            f"{rep.extra.get('temperature'):g}; percentiles "
            f"{'exact' if rep.percentiles_exact else 'from a sketch (within 0.1%)'}"
            f"{'; llama.cpp arithmetic' if rep.llama_compat else ''}")


def _chunk_lines(rep) -> list[str]:
    """llama.cpp's running per-chunk table, then an empty line."""
    out = ["chunk             PPL               ln(PPL(Q)/PPL(base))          "
           "KL Divergence              Δp RMS            Same top p"]
    for i, c in enumerate(rep.chunks, 1):
        out.append(f"{i:4d}    {c['ppl']:9.4f} ± {c['ppl_sem']:9.4f}"
                   f"    {c['ln_ppl_ratio']:10.5f} ± {c['ln_ppl_ratio_sem']:10.5f}"
                   f"    {c['kld']:10.5f} ± {c['kld_sem']:10.5f}"
                   f"    {100 * c['rms_dp']:6.3f} ± {100 * c['rms_dp_sem']:6.3f} %"
                   f"    {100 * c['same_top']:6.3f} ± {100 * c['same_top_sem']:6.3f} %")
    out.append("")
    return out


def _perplexity_lines(rep) -> list[str]:
    return [
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


def _token_probability_lines(rep) -> list[str]:
    return ["", "====== Token probability statistics ======",
            f"Mean    Δp: {100 * rep.dp_mean:6.3f} ± {100 * rep.dp_sem:5.3f} %",
            *_spread_lines("Δp", rep.dp_maximum, rep.dp_percentiles, rep.dp_minimum,
                           lambda v: f"{100 * v:6.3f}%"),
            f"RMS Δp    : {100 * rep.rms_dp:6.3f} ± {100 * rep.rms_dp_sem:5.3f} %"]


def _compare_lines(rep, label: str) -> list[str]:
    """The report as llama-perplexity --kl-divergence prints its final statistics (the same
    lines, order and printf formats), after one fastkl header line."""
    out = [_header_line(rep), ""]
    if rep.chunks and rep.n_tokens:
        out += _chunk_lines(rep)
    if rep.n_tokens:
        out += _perplexity_lines(rep)
    out.append(f"====== {_STAT_NAME[label]} statistics ======")
    out.append(f"{'Mean':<8}{label}: {rep.mean:10.6f} ± {rep.sem:10.6f}")
    out += _spread_lines(label, rep.maximum, rep.percentiles, rep.minimum,
                         lambda v: f"{v:10.6f}")
    if rep.n_tokens:
        out += _token_probability_lines(rep)
    out.append(f"Same top p: {100 * rep.same_top:6.3f} ± {100 * rep.same_top_sem:5.3f} %")
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


def _check_plot(path: str) -> None:
    """Raise ValueError when ``--plot PATH`` cannot be written or matplotlib is missing:
    checked before the (possibly long) computation, not after it."""
    problem = _plot_target_problem(path)
    if problem:
        raise ValueError(f"--plot {path}: cannot write there: {problem}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'fastkl[plot]')") from None


def cmd_compare(args) -> int:
    import fastkl

    if args.plot is not None:
        _check_plot(args.plot)
    exact = {"auto": "auto", "exact": True, "sketch": False}[args.percentiles]
    rep = fastkl.compare_logits(
        args.base, args.test, tokens=args.tokens, temperature=args.temperature, op=args.op,
        beta=args.beta, exact_percentiles=exact, backend=args.backend,
        memory_limit=args.memory_limit * 2**20,
    )
    label = _STAT_LABEL[args.op]
    if args.plot is not None:
        _plot(rep, args.plot, label)
    if args.json:
        _print_json(rep)
    else:
        print("\n".join(_compare_lines(rep, label)))
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line ``fastkl CMD: error: ...`` (exit status 2);
    subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# command: (its line in fastkl --help, its description in fastkl COMMAND --help)
_ABOUT = {
    "demo": (
        "reproduce Schulman's 'Approximating KL Divergence' table and time the backends",
        "Reproduce Schulman's experiment (q = N(0,1), p = N(0.1,1) and N(1,1)): bias and "
        "stdev of k1, k2, k3 and reverse k3 beside their closed forms, then one throughput "
        "line per backend against the numpy textbook formula."),
    "backends": ("list the backends and whether they work here", None),
    "warmup": (
        "compile every numba kernel once, into numba's on-disk cache",
        "Compile (or load) every numba kernel family for the given dtypes, so that later "
        "processes find them in numba's on-disk cache and their first calls are fast. Run it "
        "once after installing or upgrading fastkl (or numba), e.g. in a container build "
        "step; not needed for the Cython backend."),
    "mc": (
        "Monte Carlo KL estimate with its error bar from two .npy files",
        "Monte Carlo estimate of KL(q||p) (or KL(p||q) with --reverse) from log-densities of "
        "samples x ~ q, streamed from files in bounded memory."),
    "compare": (
        "llama.cpp-style KL divergence report between two logit files",
        "Compare the next-token distributions of a base and a test model row by row "
        "(KL(P_base || P_test), top-1 agreement, and with tokens Δp and perplexities), "
        "streaming both files in bounded memory."),
}


def _command(sub, name: str, func, epilog: str | None = None):
    """The parser of command ``name`` (described in ``_ABOUT``), run by ``func(args)``; the
    ``epilog`` (examples) is printed as written."""
    help_, description = _ABOUT[name]
    kw = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter} \
        if epilog else {}
    p = sub.add_parser(name, help=help_, description=description, **kw)
    p.set_defaults(func=func)
    return p


def _file_command(sub, name: str, func, epilog: str, files: dict[str, str]):
    """``_command`` for a command that reads files (mc, compare), with positional ``files``
    (metavar: help). Its own options follow, then ``_file_options``."""
    p = _command(sub, name, func, epilog)
    for metavar, text in files.items():
        p.add_argument(metavar.lower(), metavar=metavar, help=text)
    return p


def _file_options(p) -> None:
    """The options mc and compare share (listed last in their --help)."""
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--backend", default=None, help="cython, numba or numpy (default: fastest)")
    p.add_argument("--memory-limit", type=float, default=256, metavar="MB",
                   help="target peak resident memory in MiB (default: 256)")


def _add_demo(sub) -> None:
    demo = _command(sub, "demo", cmd_demo)
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


def _add_warmup(sub) -> None:
    wu = _command(sub, "warmup", cmd_warmup)
    wu.add_argument("--dtypes", default="float32,float64",
                    help="comma-separated float dtypes (default: float32,float64; also "
                    "float16 and, with ml_dtypes, bfloat16)")
    wu.add_argument("--backend", default=None,
                    help="backend(s), comma-separated (default: every compiled backend here)")
    wu.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_mc(sub) -> None:
    mc = _file_command(sub, "mc", cmd_mc, _MC_EXAMPLES, _MC_FILES)
    mc.add_argument("--estimator", default="k3", choices=NAMES,
                    help="k1 = -l, k2 = l^2/2, k3 = (r-1) - l (default: k3)")
    mc.add_argument("--reverse", action="store_true",
                    help=f"estimate KL(p||q) ({', '.join(REVERSIBLE)})")
    mc.add_argument("--mask", metavar="M", default=None,
                    help="bool or weight array of the same shape (.npy)")
    mc.add_argument("--log-iw", metavar="W", default=None,
                    help="log importance weights log q(x) - log mu(x) (.npy)")
    mc.add_argument("--reduction", default="mean",
                    choices=("mean", "sum", "token-mean", "seq-mean-token-mean",
                             "seq-mean-token-sum", "seq-mean-token-sum-norm"),
                    help="value reported besides the mean")
    mc.add_argument("--norm", type=float, default=None,
                    help="divisor of seq-mean-token-sum-norm (default: the token axis length)")
    mc.add_argument("--empty-rows", choices=("skip", "zero"), default="skip",
                    help="seq-mean-*: skip rows without tokens, or count them as 0")
    mc.add_argument("--empty", type=float, default=float("nan"),
                    help="the value of a mean over no tokens (default nan)")
    mc.add_argument("--denominator", type=float, default=None,
                    help="a global token / sequence count dividing the sum (data parallel)")
    mc.add_argument("--clamp-log-ratio", type=float, nargs=2, metavar=("LO", "HI"))
    mc.add_argument("--clamp-value", type=float, nargs=2, metavar=("LO", "HI"))
    mc.add_argument("--clamp-order", choices=("term", "weighted"), default="term",
                    help="the value clamp acts on the term (default) or on "
                         "exp(log_iw) * term (NeMo-RL)")
    mc.add_argument("--nan-policy", default="propagate", choices=("propagate", "omit", "raise"))
    _file_options(mc)


def _add_compare(sub) -> None:
    cmp_ = _file_command(sub, "compare", cmd_compare, _COMPARE_EXAMPLES, _COMPARE_FILES)
    cmp_.add_argument("--tokens", metavar="T", default=None,
                      help="observed next token per row (.npy of ints)")
    cmp_.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    cmp_.add_argument("--op", default="kl", choices=tuple(_STAT_LABEL),
                      help="per-row statistic: KL(P||Q), JSD_beta(P,Q) or H(P) (default: kl)")
    cmp_.add_argument("--beta", type=float, default=0.5, help="JSD beta (default: 0.5)")
    cmp_.add_argument("--percentiles", default="auto", choices=("auto", "exact", "sketch"),
                      help="exact (8 bytes per row kept) or a 0.1%%-accurate sketch "
                      "(default: exact when it fits in an eighth of the memory limit)")
    cmp_.add_argument("--plot", metavar="FILE.png", default=None,
                      help="write a KLD (log axis) and Δp histogram (needs matplotlib)")
    _file_options(cmp_)


def build_parser() -> argparse.ArgumentParser:
    import fastkl

    parser = _Parser(
        prog="fastkl",
        description="fastkl: fast, accurate KL divergence Monte Carlo estimators.",
        epilog="commands: demo, backends, warmup, mc, compare (fastkl COMMAND --help for examples)",
    )
    parser.add_argument("--version", action="version", version=f"fastkl {fastkl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _command(sub, "backends", cmd_backends)
    _add_warmup(sub)
    _add_mc(sub)
    _add_compare(sub)
    return parser


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _escaping_stdout():
    """Within: file names with undecodable bytes (surrogate escapes) print escaped on stdout,
    never raise (a strict stdout switched to backslashreplace, and back after)."""
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
        yield
    finally:
        if reconf is not None:
            try:
                reconf(errors=old)
            except (ValueError, OSError, TypeError):
                pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors are one line ``fastkl CMD: error: ...`` on stderr and a
    non-zero exit status (argparse's usage errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    with _escaping_stdout():
        try:
            return int(args.func(args) or 0)
        except BrokenPipeError:  # `fastkl ... | head`: stop quietly, as other tools do
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return 1
        except _USER_ERRORS as exc:
            return _fail(args.command, exc)
