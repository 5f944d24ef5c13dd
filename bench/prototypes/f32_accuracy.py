"""Accuracy of the float32-lane prototypes (issue 12) against exact values.

    PYTHONPATH=. python bench/prototypes/f32_accuracy.py [--quick]

Per term: err = |t - exact| / |exact| / max(1, |l|) with ``l`` the exact difference of the
inputs (contract: <= 1e-6). Two sweeps:

* lanes: float32 values of l (log-spaced |l| from 1e-10 to 88, both signs, plus boundaries
  +-ulps around ln2/2, 1, 87, and random points) straight into the term lanes;
* pairs: float32 (logq, logp) pairs, l32 = fl32(logp - logq) in the kernel, exact l in float64
  (the difference of two float32 is exact in float64): adds the rounding of l.

Reference: float64 (series for |l| < 0.5, libm beyond), itself checked against mpmath (50
digits) on a subsample: its error must be below 1e-13 relative, so it is adequate at 1e-6.
Special values (+-0, subnormals, +-inf, NaN, |l| > 87) go through the block-partials kernels
(fix-up included). Block sums: float32 runs of 8 widened vs the exact sum (math.fsum) of the
same float32 terms, over random blocks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import f32_kernels as K  # noqa: E402
import f32_lanes as B  # noqa: E402

F32 = np.float32


def ref_k3(l: np.ndarray) -> np.ndarray:
    """e^l - 1 - l in float64: Taylor to l**21/21! for |l| < 0.5 (truncation < 1e-22), else
    expm1(l) - l (cancels at most a factor 4.4)."""
    l = np.asarray(l, np.float64)
    out = np.expm1(l) - l
    s = np.abs(l) < 0.5
    x = l[s]
    p = np.zeros_like(x)
    for n in range(21, 1, -1):
        p = p * x + 1.0 / math.factorial(n)
    out[s] = x * x * p
    out[np.isinf(l)] = np.inf
    return out


def ref_rk3(l: np.ndarray) -> np.ndarray:
    """l e^l - (e^l - 1) = sum_n>=2 (n-1) l**n / n! (|l| < 0.5), else e^l (l - 1) + 1."""
    l = np.asarray(l, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.exp(l) * (l - 1.0) + 1.0
    s = np.abs(l) < 0.5
    x = l[s]
    p = np.zeros_like(x)
    for n in range(22, 1, -1):
        p = p * x + (n - 1) / math.factorial(n)
    out[s] = x * x * p
    out[l == -np.inf] = 1.0  # the limit (numpy_ref)
    out[l == np.inf] = np.inf
    return out


def check_reference(npts: int) -> dict:
    import mpmath

    mpmath.mp.dps = 50
    rng = np.random.default_rng(1)
    mag = 10.0 ** rng.uniform(-10, math.log10(88.0), npts)
    l = (mag * rng.choice([-1.0, 1.0], npts)).astype(F32).astype(np.float64)
    r3, rr = ref_k3(l), ref_rk3(l)
    e3 = er = 0.0
    for x, a, b in zip(l, r3, rr, strict=True):
        X = mpmath.mpf(float(x))
        ex = mpmath.exp(X)
        t3 = ex - 1 - X
        tr = X * ex - (ex - 1)
        e3 = max(e3, float(abs((a - t3) / t3)))
        er = max(er, float(abs((b - tr) / tr)))
    return {"k3": e3, "rk3": er}


def sweep_lanes(n_rand: int) -> np.ndarray:
    mag = np.concatenate([np.logspace(-10, math.log10(88.0), 4000),
                          10.0 ** np.random.default_rng(2).uniform(-10, math.log10(88.0), n_rand)])
    pts = [mag, -mag]
    for b in (math.log(2) / 2, 1.0, 87.0, 0.5, 2.0, 88.0):
        c = F32(b)
        u = np.arange(-8, 9)
        v = np.nextafter(c, F32(np.inf)) - c
        pts.append(np.array([c + F32(k) * v for k in u], np.float64))
        pts.append(-pts[-1])
    l = np.concatenate(pts).astype(F32)
    return l[(np.abs(l) >= 1e-10) & (np.abs(l) <= 88.0)]


REGIMES = [(1e-10, 1e-4), (1e-4, 0.35), (0.35, 1.0), (1.0, 10.0), (10.0, 88.0)]


def regime_table(name: str, l_exact: np.ndarray, t: np.ndarray, ref: np.ndarray) -> list:
    if "rk3" in name:  # reverse k3 lanes stop at 80 (float32 overflow from 84.3): fix-up
        keep = np.abs(l_exact) <= 80.0
        l_exact, t, ref = l_exact[keep], t[keep], ref[keep]
        name += " (|l| <= 80)"
    err = np.abs(t.astype(np.float64) - ref) / np.abs(ref) / np.maximum(1.0, np.abs(l_exact))
    rows = []
    for sign in (1, -1):
        for lo, hi in REGIMES:
            a = np.abs(l_exact)
            sel = (np.sign(l_exact) == sign) & (a >= lo) & (a <= hi)
            if sel.any():
                rows.append((name, f"{'+' if sign > 0 else '-'}[{lo:g}, {hi:g}]", int(sel.sum()),
                             float(err[sel].max())))
    return rows


def print_rows(rows):
    print("| kernel | l in | points | max err / max(1,|l|) |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        flag = "" if r[3] <= 1e-6 else "  **over 1e-6**"
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e}{flag} |")


def specials(libs) -> list[str]:
    """Block partials over special lanes: every backend must give the same (W, S, nbad)."""
    out = []
    tiny = np.float32(1e-45)
    cases = {
        "+0, -0": ([0.0, -0.0], [0.0, 0.0]),
        "subnormal l": ([0.0, 0.0, 0.0], [tiny, -tiny, F32(1e-40)]),
        "l = +inf": ([0.0], [np.inf]),
        "l = -inf": ([np.inf], [0.0]),
        "NaN": ([np.nan], [0.0]),
        "l = 88.5 (fix-up)": ([0.0], [88.5]),
        "l = 87.5 (fix-up)": ([0.0], [87.5]),
        "l = -100": ([0.0], [-100.0]),
    }
    for label, (q, p) in cases.items():
        # pad to a block of ordinary lanes so the vector loops run
        q = np.array(list(q) + [0.0] * 100, F32)
        p = np.array(list(p) + [0.0] * 100, F32)
        res = []
        for kname in ("k3_fused_lanes64", "k3_split_lanes64", "rk3_fused_lanes64"):
            pt = K.partials(kname, q, p, True)[0]
            res.append(f"numba {kname} S={pt[1]:.6g} W={pt[0]:g} M2={pt[2]:.3g}")
        for b, lib in libs.items():
            pt = B.c_partials(lib, "k3", q, p, True)[0]
            res.append(f"C {b} S={pt[1]:.6g} W={pt[0]:g} M2={pt[2]:.3g}")
        lx = p.astype(np.float64) - q.astype(np.float64)
        ok = np.isfinite(ref_k3(lx)) | np.isinf(lx)
        exp_S = np.sum(ref_k3(lx)[~np.isnan(lx)])
        exp_R = np.sum(ref_rk3(lx)[~np.isnan(lx)])
        out.append(f"| {label} | k3 S={exp_S:.6g} (reverse {exp_R:.6g}) "
                   f"W={int((~np.isnan(lx)).sum())} | "
                   + "; ".join(res) + " |")
        del ok
    return out


def block_sums(nblk: int) -> list:
    rng = np.random.default_rng(3)
    rows = []
    for label, mu in (("l ~ N(-0.5, 1)", 1.0), ("l ~ N(0, 0.1)", 0.1)):
        x = rng.standard_normal(nblk * K.BLOCK)
        q = (-0.5 * x * x).astype(F32)
        p = (-0.5 * (x - mu) ** 2).astype(F32)
        l32 = p - q
        t = K.terms32("k3_fused", l32).astype(np.float64)
        exact_terms = ref_k3(p.astype(np.float64) - q.astype(np.float64))
        for kname in ("k3_fused_lanes64", "k3_fused", "k3_fused_sum64"):
            part = K.partials(kname, q, p)
            acc_err = tot_err = 0.0
            for b in range(nblk):
                sl = slice(b * K.BLOCK, (b + 1) * K.BLOCK)
                fs = math.fsum(t[sl])
                acc_err = max(acc_err, abs(part[b, 1] - fs) / fs)
                fe = math.fsum(exact_terms[sl])
                tot_err = max(tot_err, abs(part[b, 1] - fe) / fe)
            rows.append((label, kname, acc_err, tot_err))
        # M2 (stats): against the float64 two-pass M2 of the exact terms
        part = K.partials("k3_fused_lanes64", q, p, True)
        et = exact_terms.reshape(nblk, K.BLOCK)
        m2 = ((et - et.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        rows.append((label, "k3_fused_lanes64 M2", float("nan"),
                     float(np.max(np.abs(part[:, 2] - m2) / m2))))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    nref = 300 if args.quick else 3000
    nr = 20_000 if args.quick else 400_000
    print("float64 reference vs mpmath (50 digits), max relative error over "
          f"{nref} points: {check_reference(nref)}")
    l = sweep_lanes(nr)
    lx = l.astype(np.float64)
    r3, rr = ref_k3(lx), ref_rk3(lx)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        libs = B.build_c(tmp)
        print(f"\n## lanes: {l.size} float32 values of l")
        for name in ("k3_fused", "k3_split", "rk3_fused"):
            ref = rr if name.startswith("rk3") else r3
            rows += regime_table("numba " + name, lx, K.terms32(name, l), ref)
        for b, lib in libs.items():
            for est in ("k3", "k3_split", "rk3"):
                ref = rr if est == "rk3" else r3
                rows += regime_table(f"C {b} {est}", lx, B.c_terms(lib, est, l), ref)
        print_rows(rows)
        # pairs: rounding of l included
        rng = np.random.default_rng(4)
        n = nr
        q = (rng.standard_normal(n) * 30).astype(F32)
        mag = 10.0 ** rng.uniform(-10, math.log10(87.0), n) * rng.choice([-1.0, 1.0], n)
        p = (q.astype(np.float64) + mag).astype(F32)
        lx = p.astype(np.float64) - q.astype(np.float64)
        keep = (np.abs(lx) >= 1e-10) & (np.abs(lx) <= 87.0)
        q, p, lx = q[keep], p[keep], lx[keep]
        l32 = p - q
        print(f"\n## pairs: {q.size} float32 (logq, logp), l rounded to float32 in the kernel")
        rows = []
        rows += regime_table("numba k3_fused", lx, K.terms32("k3_fused", l32), ref_k3(lx))
        rows += regime_table("numba k3_split", lx, K.terms32("k3_split", l32), ref_k3(lx))
        rows += regime_table("numba rk3_fused", lx, K.terms32("rk3_fused", l32), ref_rk3(lx))
        for nm, t in (("k1", -l32), ("k2", F32(0.5) * l32 * l32)):
            ref = -lx if nm == "k1" else 0.5 * lx * lx
            rows += regime_table(nm + " (float32 -l, 0.5*l*l)", lx, t, ref)
        print_rows(rows)
        print("\n## special lanes through the block partials (fix-up included)")
        print("| case | expected | got |\n| --- | --- | --- |")
        for r in specials(libs):
            print(r)
    print("\n## block sums (k3), max over blocks of |S - exact| / exact")
    print("| data | kernel | vs fsum of its own float32 terms (accumulation) "
          "| vs fsum of exact terms (total) |")
    print("| --- | --- | ---: | ---: |")
    for label, kname, a, t in block_sums(64 if args.quick else 512):
        print(f"| {label} | {kname} | {a:.2e} | {t:.2e} |")


if __name__ == "__main__":
    main()
