#!/usr/bin/env python
"""Seeded-bug (mutation) check of the test suite: does a realistic bug make a test fail?

Each mutant below is one exact textual replacement (file, old snippet, new snippet) that
plants a bug of the kind that has happened or easily could (a float32 subtraction where the
README promises float64, a sign, a missing factor, n for n - 1, a temperature divided instead
of multiplied in one load path...), plus the pytest selection that should catch it. For each
mutant, one at a time:

1. a fresh scratch copy of the repository (a copy of a pristine template copied once from
   the working tree: tracked and untracked files, the built extensions and numba's cache
   included; never ``.git``), so nothing ever touches the working tree;
2. the snippet replaced; it must occur exactly once, otherwise the mutant is reported
   **stale** (the code moved on: update the snippet), never silently counted;
3. the Cython extensions rebuilt in the copy when a ``.pyx`` / ``.h`` / ``.c`` changed
   (``setup.py build_ext --inplace --force``; a build failure is reported as **build-error**);
4. the selected tests run (``pytest -x``, ``CI=true`` so hypothesis is derandomized):
   a failure is **caught**, a pass **missed**; a timeout or a pytest usage error is
   reported as such.

Usage (CPU-heavy, on demand, never in CI)::

    python tools/mutants.py                 # every mutant, one job
    python tools/mutants.py --only 3,8      # by number (1-based) or name
    python tools/mutants.py --list          # the list, and which snippets are stale
    python tools/mutants.py --baseline      # first: every selection must pass unmutated
    python tools/mutants.py --jobs 2 --markdown docs/mutants.md

Keep snippets short (one expression or statement) so that they survive unrelated edits, and
prefer code that is unlikely to move. A numba mutant recompiles that module's kernels in the
copy (numba's cache is keyed on the source file), so its selection should be narrow.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
B = "fastkl/backends/"


@dataclass(frozen=True)
class Mutant:
    """One seeded bug: replace ``old`` (exactly once) by ``new`` in ``path``; ``tests`` are
    the pytest arguments (paths, ``-k`` expressions) of the tests that should catch it."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def _t(*args: str) -> tuple[str, ...]:
    return args


MUTANTS: list[Mutant] = [
    # ---- the eight the issue 15 experiment missed --------------------------------------
    Mutant("c-f32-sub", B + "cython/typed.h",
           "L[i] = (double)p[i] - (double)q[i];", "L[i] = (double)(p[i] - q[i]);",
           _t("tests/test_accumulation.py", "-k", "float32 and cython"),
           "float32 logp - logq subtracted in float32 (Cython, contiguous load; the dtype "
           "template: the float64 instance is unchanged by it)"),
    Mutant("numba-strided-temp", B + "numba/logits.py",
           "x = np.float64(buf[o + i * s1]) * inv_t", "x = np.float64(buf[o + i * s1]) / inv_t",
           _t("tests/test_layouts.py", "-k", "numba"),
           "temperature divided, not multiplied, in the strided logits load (numba)"),
    Mutant("c-strided-temp", B + "cython/typed.h",
           "X[i] = (double)p[i * s] * inv_t;", "X[i] = (double)p[i * s] / inv_t;",
           _t("tests/test_layouts.py", "-k", "cython"),
           "temperature divided, not multiplied, in the strided logits load (Cython; the "
           "dtype template: float32 and float64 both)"),
    Mutant("c-rk1-grad-sign", B + "cython/mc.h",
           "G[i] = -R * (l + 1.0);", "G[i] = -R * (l - 1.0);",
           _t("tests/test_grad.py", "-k", "matches and cython"),
           "sign of one term of the reverse-k1 derivative (Cython)"),
    Mutant("cli-std-is-sem", "fastkl/cli.py",
           "Std dev   : {rep.std:", "Std dev   : {rep.sem:",
           _t("tests/test_reports.py", "-k", "cli_mc"),
           "fastkl mc prints the sem as 'Std dev'"),
    Mutant("same-top-sem-n", "fastkl/stream.py",
           "return f, math.sqrt(f * (1 - f) / (n - 1)) if n > 1",
           "return f, math.sqrt(f * (1 - f) / n) if n > 1",
           _t("tests/test_reports.py", "-k", "logits_report_error_bars"),
           "same_top_sem with n instead of n - 1"),
    # (the llama.cpp-mode report shares the exact mode's helpers: the same site, its tests)
    Mutant("llama-same-top-sem-n", "fastkl/stream.py",
           "return f, math.sqrt(f * (1 - f) / (n - 1)) if n > 1",
           "return f, math.sqrt(f * (1 - f) / n) if n > 1",
           _t("tests/test_llama_compat.py"),
           "llama.cpp-mode same top p error bar with n instead of n - 1"),
    Mutant("llama-rms-dp-sem-2", "fastkl/stream.py",
           "return rms, sem_sq / (2 * rms) if", "return rms, sem_sq / rms if",
           _t("tests/test_llama_compat.py"),
           "llama.cpp-mode RMS Δp error bar missing its factor 2"),
    Mutant("rms-dp-sem-2", "fastkl/stream.py",
           "return rms, sem_sq / (2 * rms) if", "return rms, sem_sq / rms if",
           _t("tests/test_reports.py", "-k", "logits_report_error_bars"),
           "rms_dp_sem without its factor 2"),
    Mutant("numba-fixup-grad-sign", B + "numba/logits.py",
           "gv[i] = (_exp_exact(lq) - _exp_exact(lp)) * f",
           "gv[i] = (_exp_exact(lp) - _exp_exact(lq)) * f",
           _t("tests/test_grad.py", "-k", "far_below and numba"),
           "(P - Q) for (Q - P) in the subnormal fix-up lane of the numba KL gradient"),
    # ---- compiled Monte Carlo kernels ---------------------------------------------------
    Mutant("numba-f32-sub", B + "numba/mc.py",
           "lb[i] = np.float64(pv[i]) - np.float64(qv[i])", "lb[i] = np.float64(pv[i] - qv[i])",
           _t("tests/test_accumulation.py", "-k", "float32_sums and numba"),
           "float32 logp - logq subtracted in float32 (numba, contiguous load)"),
    Mutant("numba-rk1-grad", B + "numba/mc.py",
           "gb[i] = -rr * (l + 1.0)", "gb[i] = -rr * (l - 1.0)",
           _t("tests/test_grad.py", "-k", "matches and numba and rk1"),
           "sign in the reverse-k1 derivative (numba)"),
    Mutant("numba-k2-grad", B + "numba/mc.py",
           "gb[i] = 1.0 if est == K1 else -lb[i]", "gb[i] = 1.0 if est == K1 else lb[i]",
           _t("tests/test_grad.py", "-k", "matches and numba and k2"),
           "sign of the k2 derivative (numba)"),
    Mutant("c-slow-rk3-grad", B + "cython/mc.h",
           "gg = -r * l;", "gg = r * l;",
           _t("tests/test_grad.py", "-k", "special_lanes and cython"),
           "sign of the reverse-k3 derivative in the |l| > 700 libm lane only (Cython)"),
    Mutant("c-grad-f32-scale", B + "cython/typed.h",
           "o[i] = (FK_T)(V[i] * scale);", "o[i] = (FK_T)V[i];",
           _t("tests/test_grad.py", "-k", "matches and cython"),
           "gradient without mask stored without the reduction's row scale (Cython; the "
           "dtype template: float32 and float64 both)"),
    Mutant("c-tail-w2", B + "cython/mc.h",
           "a->w2[j] += ok ? ww : 0.0;", "a->w2[j] += ok ? w : 0.0;",
           _t("tests/test_reports.py", "-k", "klstats and cython"),
           "sum of squared weights takes w in the block tail (Cython): n_eff, sem"),
    Mutant("c-exp-coef", B + "cython/common.h",
           "P = P * r + 1.0 / 720.0;", "P = P * r + 1.0 / 710.0;",
           _t("tests/test_numerics.py", "-k", "mpmath and cython"),
           "a Taylor coefficient of the float64 exp series mistyped (Cython)"),
    Mutant("pyx-mask-kind", B + "cython/_mc.pyx",
           "A.mkind = 1 if cnp.PyArray_TYPE(m_arr) == cnp.NPY_UINT8 else 2", "A.mkind = 1",
           _t("tests/test_grad.py", "-k", "matches and cython and k1"),
           "float64 weights read as a uint8 mask (Cython wrapper)"),
    # ---- compiled logits kernels --------------------------------------------------------
    Mutant("pyx-log-probs", B + "cython/_logits.pyx",
           "A.log_probs = log_probs", "A.log_probs = 0",
           _t("tests/test_logits.py", "-k", "log_probs and cython"),
           "log_probs at T = 1 renormalised like logits (Cython wrapper)"),
    Mutant("c-token-sign", B + "cython/logits.h",
           "(xb * A->inv_t - st.MB) - log(st.ZB)", "(xb * A->inv_t - st.MB) + log(st.ZB)",
           _t("tests/test_layouts.py", "-k", "cython"),
           "token log-prob adds log Z instead of subtracting it (Cython)"),
    Mutant("numba-rescale-sign", B + "numba/logits.py",
           "sa * (S - (da - db) * ZA)", "sa * (S + (da - db) * ZA)",
           _t("tests/test_logits.py", "tests/test_layouts.py", "-k",
              "(running_max or grows) and numba"),
           "sign in the KL running-sum rescale when the row max grows (numba)"),
    # ---- the numpy reference ------------------------------------------------------------
    Mutant("ref-rk3-grad", B + "numpy/mc.py",
           "g = -r * l\n", "g = r * l\n",
           _t("tests/test_grad.py", "-k", "reference_grad and rk3"),
           "sign of the reverse-k3 derivative in the reference"),
    Mutant("ref-logits-grad-temp", B + "numpy/logits.py",
           "* (inv_t * rowscale[:, None])", "* rowscale[:, None]",
           _t("tests/test_grad.py", "-k", "logits_grad_is_the_derivative and numpy"),
           "reference KL gradient without its 1/T"),
    Mutant("ref-w2", B + "numpy/mc.py",
           "out[..., 3] = (wb * wb).sum(axis=-1)", "out[..., 3] = wb.sum(axis=-1)",
           _t("tests/test_reports.py", "-k", "klstats and numpy"),
           "reference partial sum of w**2 takes w"),
    # ---- reductions (public layer) -------------------------------------------------------
    Mutant("merge-spread", "fastkl/_core.py",
           "tot[:, 2] = tot[:, 2] + spread", "tot[:, 2] = tot[:, 2]",
           _t("tests/test_reports.py", "-k", "klstats and numpy"),
           "Chan merge of block partials drops the between-block spread"),
    Mutant("sem-n-not-neff", "fastkl/_core.py",
           "sem = std / math.sqrt(W * W / W2)", "sem = std / math.sqrt(n)",
           _t("tests/test_reports.py", "-k", "klstats and numpy"),
           "kl_mc_stats sem with n instead of Kish's n_eff"),
    Mutant("grad-rowscale-rl", "fastkl/mc.py",
           'rowscale = base / wrow if how == "seq-mean-token-mean" else base',
           'rowscale = base if how == "seq-mean-token-mean" else base / wrow',
           _t("tests/test_grad.py", "-k", "reference_grad and seq"),
           "RL reductions' gradient normalisations swapped"),
    Mutant("logits-mask-mean", "fastkl/_core.py",
           "weight = float(vals.size) if mask is None else",
           "weight = float(vals.size) if True else",
           _t("tests/test_logits.py", "-k", "mask_and_reduction and numpy"),
           "masked mean of a logits op divides by all rows"),
    # ---- streaming statistics -----------------------------------------------------------
    Mutant("chan-merge-square", "fastkl/stream.py",
           "d * d * (Wa * Wb / W)", "d * (Wa * Wb / W)",
           _t("tests/test_reports.py", "-k", "logits_report_error_bars"),
           "Chan merge of two parts without the squared mean difference"),
    Mutant("moments-ddof", "fastkl/stream.py",
           "math.sqrt(self.m2 / (self.n - 1))", "math.sqrt(self.m2 / self.n)",
           _t("tests/test_reports.py", "-k", "logits_report_error_bars"),
           "LogitsReport std with n instead of n - 1"),
    Mutant("ppl-sem", "fastkl/stream.py",
           "ppl_test_sem=ppl_t * st", "ppl_test_sem=st",
           _t("tests/test_reports.py", "-k", "logits_report_error_bars"),
           "PPL(Q) error bar not scaled by PPL"),
    Mutant("cor-sign", "fastkl/stream.py",
           "cov = 0.5 * (vt + vb - vd)", "cov = 0.5 * (vt + vb + vd)",
           _t("tests/test_reports.py", "-k", "logits_report_error_bars"),
           "covariance of the NLLs from the variance of their difference: sign"),
    # ---- CLI ----------------------------------------------------------------------------
    Mutant("demo-ci-std", "fastkl/_demo.py",
           "ci = Z95 * st.sem / true", "ci = Z95 * st.std / true",
           _t("tests/test_reports.py", "-k", "demo_values"),
           "demo's 95% half-width from the std instead of the sem"),
    Mutant("demo-k2-closed", "fastkl/_demo.py",
           "return m2 / 4.0, math.sqrt(2.0 + m2)", "return m2 / 2.0, math.sqrt(2.0 + m2)",
           _t("tests/test_reports.py", "-k", "closed_forms"),
           "demo's closed-form k2 bias off by 2"),
    Mutant("cli-rms-percent", "fastkl/cli.py",
           "{100 * rep.rms_dp_sem:5.3f}", "{rep.rms_dp_sem:5.3f}",
           _t("tests/test_reports.py", "-k", "cli_compare"),
           "fastkl compare prints the RMS Δp error bar as a fraction, not in %"),
    # ---- numba float32 lanes (issue 12; tests/test_f32_lanes.py turns them on) ----------
    Mutant("numba-f32-tiny", B + "numba/mc.py",
           "if mx <= fast_bits and mn >= TINY32_KEY:", "if mx <= fast_bits:",
           _t("tests/test_f32_lanes.py", "-k", "every_term"),
           "float32 lanes keep 0 < |l| < 2**-62 (k3 terms underflow) instead of the fix-up"),
    Mutant("numba-f32-masked-nan", B + "numba/mc.py",
           "return t * w if w != ZERO_32 else ZERO_32", "return t * w",
           _t("tests/test_f32_lanes.py", "-k", "block_sums and k3"),
           "float32 lanes add 0 * NaN of a masked-out lane (numba uint8 mask)"),
]


# --------------------------------------------------------------------------- machinery

_COMPILED_SUFFIXES = (".pyx", ".h", ".c", ".pxd")
_IGNORE = shutil.ignore_patterns(".git", ".hypothesis", ".pytest_cache", ".ruff_cache",
                                 ".venv", "*.egg-info")


def _status_of_snippet(m: Mutant, root: Path) -> str | None:
    """None when the snippet occurs exactly once in ``root``, else why the mutant is stale."""
    p = root / m.path
    if not p.is_file():
        return f"stale: {m.path} not found"
    k = p.read_text(encoding="utf-8").count(m.old)
    if k != 1:
        return f"stale: snippet found {k} times in {m.path}"
    return None


def _pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), CI="true", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-m", "not slow", *tests]
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return r.returncode, lines[-1] if lines else ""


def _build(copy: Path, timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"]
    try:
        r = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "build timeout"
    tail = [ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln.lower()]
    return r.returncode == 0, (tail[-1] if tail else "")


def run_one(i: int, m: Mutant, template: Path, work: Path, timeout: float,
            keep: bool) -> dict:
    t0 = time.perf_counter()
    res = {"i": i, "m": m, "status": "", "detail": ""}
    stale = _status_of_snippet(m, template)
    if stale:
        res.update(status="stale", detail=stale)
        return res
    copy = work / f"m{i:02d}"
    shutil.copytree(template, copy, symlinks=True)
    try:
        p = copy / m.path
        p.write_text(p.read_text(encoding="utf-8").replace(m.old, m.new), encoding="utf-8")
        if m.path.endswith(_COMPILED_SUFFIXES):
            ok, msg = _build(copy, timeout)
            if not ok:
                res.update(status="build-error", detail=msg)
                return res
        rc, tail = _pytest(copy, m.tests, timeout)
        if rc is None:
            res.update(status="timeout", detail=tail)
        elif rc == 1:
            res.update(status="caught", detail=tail)
        elif rc == 0:
            res.update(status="missed", detail=tail)
        else:
            res.update(status="error", detail=f"pytest exit {rc}: {tail}")
        return res
    finally:
        res["seconds"] = time.perf_counter() - t0
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


def make_template(work: Path) -> Path:
    """A pristine copy of the working tree (with its built extensions and numba cache,
    mtimes preserved so that the cache stays valid)."""
    template = work / "template"
    shutil.copytree(ROOT, template, symlinks=True, ignore=_IGNORE)
    return template


def baseline(template: Path, mutants: list[Mutant], timeout: float) -> list[str]:
    """Each distinct selection must pass on the unmutated copy; returns the failures."""
    bad = []
    for tests in dict.fromkeys(m.tests for m in mutants):
        rc, tail = _pytest(template, tests, timeout)
        print(f"baseline {' '.join(tests)}: exit {rc} ({tail})", flush=True)
        if rc != 0:
            bad.append(" ".join(tests))
    return bad


def table(results: list[dict]) -> str:
    rows = ["| # | mutant | file | bug | selection | result | s |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["m"]
        sel = " ".join(m.tests).replace("|", "\\|")
        what = m.what.replace("|", "\\|")
        rows.append(f"| {r['i']} | `{m.name}` | `{m.path}` | {what} | `{sel}` | "
                    f"{r['status']} | {r.get('seconds', 0):.0f} |")
    counted = [r for r in results if r["status"] in ("caught", "missed", "timeout")]
    caught = sum(r["status"] == "caught" for r in counted)
    other = len(results) - len(counted)
    pct = 100.0 * caught / len(counted) if counted else float("nan")
    rows.append("")
    rows.append(f"caught {caught} of {len(counted)} ({pct:.0f}%); "
                f"{other} stale / build-error / error (not counted)")
    return "\n".join(rows)


def _select(spec: str | None) -> list[tuple[int, Mutant]]:
    all_ = list(enumerate(MUTANTS, start=1))
    if not spec:
        return all_
    want = {s.strip() for s in spec.split(",") if s.strip()}
    out = [(i, m) for i, m in all_ if str(i) in want or m.name in want]
    unknown = want - {str(i) for i, _ in out} - {m.name for _, m in out}
    if unknown:
        raise SystemExit(f"mutants.py: unknown mutant(s): {', '.join(sorted(unknown))}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated numbers (1-based) or names")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per build / pytest")
    ap.add_argument("--list", action="store_true", help="list the mutants and stale snippets")
    ap.add_argument("--baseline", action="store_true",
                    help="first check that every selection passes without a mutant")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = ap.parse_args(argv)
    chosen = _select(args.only)

    if args.list:
        for i, m in chosen:
            st = _status_of_snippet(m, ROOT) or "ok"
            print(f"{i:3d} {m.name:<24} {m.path:<34} {st}\n    {m.what}\n"
                  f"    tests: {' '.join(m.tests)}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="fastkl-mutants-"))
    try:
        template = make_template(work)
        if args.baseline:
            bad = baseline(template, [m for _, m in chosen], args.timeout)
            if bad:
                print("selections failing without any mutant:\n  " + "\n  ".join(bad))
                return 2
        results = []

        def job(im):
            r = run_one(im[0], im[1], template, work, args.timeout, args.keep)
            print(f"{r['i']:3d} {r['m'].name:<24} {r['status']:<11} "
                  f"{r.get('seconds', 0):6.0f} s  {r['detail']}", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
            results = list(ex.map(job, chosen))
        text = table(results)
        print()
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n", encoding="utf-8")
        missed = [r for r in results if r["status"] != "caught"]
        return 1 if missed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"scratch copies kept in {work}")


if __name__ == "__main__":
    sys.exit(main())
