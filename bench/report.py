"""The benchmark report: runs the suites over a sweep of sizes and thread counts (each in a
fresh process, through ``bench_mc.py`` / ``bench_logits.py`` / ``latency.py --json``) and
writes a markdown report, a PNG plot and the raw JSON.

    python bench/report.py                     # default sweep, a few minutes
    python bench/report.py --quick             # tiny sizes: a smoke run (seconds)
    python bench/report.py --large             # adds 1e9 pairs and [8192, 131072] logits
    python bench/report.py --out docs/bench    # where report.md, throughput.png, results.json go
    python bench/report.py --rounds 3          # headline rows: the fastest of 3 rounds

The report is stamped with the CPU model, core count and library versions; every table row
is a measured number from this run, losses included. Never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import half_inputs  # noqa: E402

MC_SIZES = [1e3, 1e4, 1e5, 1e6, 1e7, 5e7]
MC_LARGE = [1e9]
LOGITS_SHAPES = [(64, 32000), (512, 32000), (512, 128000), (2048, 131072)]
LOGITS_LARGE = [(8192, 131072)]
HEAD_MC = 5e7  # the headline sizes of the targets
HEAD_LOGITS = (512, 128000)
# The same ops on inputs small enough to stay in the last-level cache (8 MB; this report's
# reference machine has 32 MB of L3) but large enough that the call overhead is < 1%: their
# speed is the arithmetic's limit, with the DRAM traffic taken away.
INCACHE_MC = 1e6
INCACHE_LOGITS = (8, 128000)
# ops in the size sweep and the plot (the headline runs time every op)
SWEEP_MC_OPS = "k3"
SWEEP_LOGITS_OPS = "kl"


def _run(script: str, args: list[str], threads: int | None = None) -> dict:
    """One suite in a fresh process; its JSON result (exit code 1 = a mismatch, kept)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--json", path]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    print("$", " ".join(os.path.basename(c) if c == sys.executable else c for c in cmd[1:]),
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    try:
        if res.returncode not in (0, 1):
            raise RuntimeError(f"{script} failed ({res.returncode}):\n{res.stderr[-2000:]}")
        with open(path) as f:
            out = json.load(f)
    finally:
        os.unlink(path)
    out["wall_s"] = time.perf_counter() - t0
    return out


def _mc_args(size: float, ops: str | None, budget: float, peers: bool = True) -> list[str]:
    args = ["--size", f"{size:g}", "--budget", str(budget),
            "--repeats", str(int(min(50, max(5, 1e7 / size))))]
    if ops:
        args += ["--ops", ops]
    if not peers:
        args.append("--no-peers")
    return args


def _logits_args(shape, ops: str | None, budget: float, peers: bool = True) -> list[str]:
    args = ["--rows", str(shape[0]), "--vocab", str(shape[1]), "--budget", str(budget),
            "--repeats", str(int(min(50, max(3, 1e8 / (shape[0] * shape[1])))))]
    if ops:
        args += ["--ops", ops]
    if not peers:
        args.append("--no-peers")
    return args


def _best_of(runs: list[dict]) -> dict:
    """One run from several rounds of the same suite: per (impl, op) the fastest round (a
    mismatch or error in any round is kept), per roofline the fastest read. Every
    implementation gets the same treatment, so the ratios stay side by side."""
    out = dict(runs[0])
    out["rounds"] = len(runs)
    roof = {}
    for run in runs:
        for r in run["roofline"]:
            if r["impl"] not in roof or r["time_s"] < roof[r["impl"]]["time_s"]:
                roof[r["impl"]] = r
    out["roofline"] = list(roof.values())
    good = [r["gbs"] for r in out["roofline"] if r["ok"]]
    out["roofline_gbs"] = max(good) if good else float("nan")
    rows = {}
    for run in runs:
        for r in run["rows"]:
            key = (r["impl"], r["op"])
            old = rows.get(key)
            if old is None or old["status"] == "ok" and (
                    r["status"] != "ok" or r["time_s"] < old["time_s"]):
                rows[key] = r
    out["rows"] = list(rows.values())
    return out


# --------------------------------------------------------------------------- markdown


def _table(result: dict) -> str:
    import io

    buf = io.StringIO()
    _common.print_table(result, file=buf)
    return buf.getvalue()


def _sweep_table(runs: list[dict], op: str, size_label) -> str:
    """GB/s and ns per element of each implementation of ``op`` across sizes."""
    impls: list[str] = []
    for r in runs:
        for row in r["rows"]:
            if row["op"] == op and row["impl"] not in impls:
                impls.append(row["impl"])
    lines = ["| size | roofline GB/s | " + " | ".join(f"{i} GB/s (ns/elem)" for i in impls)
             + " |", "| --- | ---: | " + " | ".join(["---:"] * len(impls)) + " |"]
    for r in runs:
        cells = [size_label(r), f"{r['roofline_gbs']:.1f}"]
        for i in impls:
            row = next((x for x in r["rows"] if x["impl"] == i and x["op"] == op), None)
            if row is None or row["time_s"] is None:
                cells.append("" if row is None else row["status"])
            else:
                cells.append(f"{row['gbs']:.2f} ({1e9 * row['time_s'] / r['size']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _scaling_table(one: dict, many: dict, threads: int) -> str:
    lines = [f"| impl | op | 1 thread ms | {threads} threads ms | speed-up |",
             "| --- | --- | ---: | ---: | ---: |"]
    t1 = {(r["impl"], r["op"]): r["time_s"] for r in one["rows"] if r["time_s"]}
    for r in many["rows"]:
        a = t1.get((r["impl"], r["op"]))
        if a and r["time_s"]:
            lines.append(f"| {r['impl']} | {r['op']} | {a * 1e3:.2f} | {r['time_s'] * 1e3:.2f} | "
                         f"{a / r['time_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def _incache_table(head: dict, incache: dict) -> str:
    """Per fastkl op: GB/s on the headline size and on the cache-resident size, each as a
    percentage of the headline run's DRAM roofline. The in-cache percentage is the ceiling of
    the kernel's arithmetic: an op cannot reach more of the roofline than that on this CPU,
    whatever the memory does (above 100%: the arithmetic is faster than DRAM)."""
    roof = head["roofline_gbs"]
    fast = {(r["impl"], r["op"]): r for r in incache["rows"] if r["time_s"]}
    lines = ["| impl | op | headline GB/s | % of roofline | in-cache GB/s | in-cache as % of "
             "roofline |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in head["rows"]:
        f = fast.get((r["impl"], r["op"]))
        if r["kind"] == "peer" or not r["time_s"] or f is None:
            continue
        lines.append(f"| {r['impl']} | {r['op']} | {r['gbs']:.2f} | {100 * r['gbs'] / roof:.0f}% "
                     f"| {f['gbs']:.2f} | {100 * f['gbs'] / roof:.0f}% |")
    return "\n".join(lines) + "\n"


def _latency_table(lat: dict) -> str:
    lines = ["| what | min ms | all runs ms |", "| --- | ---: | --- |"]
    for key, vals in lat["seconds"].items():
        lines.append(f"| {key} | {min(vals) * 1e3:.1f} | "
                     + ", ".join(f"{v * 1e3:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot


def plot(mc_runs: list[dict], lg_runs: list[dict], stamp: str, path: str) -> bool:
    """Throughput vs size per implementation (log-log), the roofline drawn. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors: dict[str, str] = {}  # one colour per implementation in both panels
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = ((axes[0], mc_runs, SWEEP_MC_OPS, "kl_mc k3 mean: pairs", "input pairs"),
              (axes[1], lg_runs, SWEEP_LOGITS_OPS, "kl_logits per row: rows x vocab",
               "elements per array"))
    for ax, runs, op, title, xlabel in panels:
        if not runs:
            continue
        xs = [r["size"] for r in runs]
        ax.plot(xs, [r["roofline_gbs"] for r in runs], "k--", lw=2, label="roofline (read)")
        impls: list[str] = []
        for r in runs:
            impls += [x["impl"] for x in r["rows"] if x["op"] == op and x["impl"] not in impls]
        for impl in impls:
            pts = [(r["size"], x["gbs"]) for r in runs for x in r["rows"]
                   if x["impl"] == impl and x["op"] == op and x["gbs"]]
            if pts:
                style = "o-" if impl.startswith("fastkl") else "s:"
                color = colors.setdefault(impl, palette[len(colors) % len(palette)])
                xs_i, ys_i = zip(*pts, strict=True)
                ax.plot(xs_i, ys_i, style, label=impl, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GB/s of input")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(stamp, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "bench"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--large", action="store_true",
                    help="add 1e9 pairs and [8192, 131072] logits (fastkl only: 8+ GB)")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="seconds of repeats per implementation and size (default 2)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of the headline, 1-thread and in-cache runs, minutes apart; "
                    "each row keeps its fastest round (default 2: other tenants of a shared "
                    "machine come and go)")
    ap.add_argument("--from-json", default=None, metavar="RESULTS",
                    help="write the report and plot from a results.json of an earlier run "
                    "(nothing is timed)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    threads = os.cpu_count() or 1
    t_start = time.perf_counter()

    if args.quick:
        mc_sizes, lg_shapes, head_mc, head_lg = [1e3, 1e4, 1e5], [(8, 1000), (16, 4000)], 1e5, (16,
                                                                                          4000)
        cache_mc, cache_lg = 1e4, (4, 1000)
    else:
        cache_mc, cache_lg = INCACHE_MC, INCACHE_LOGITS
        mc_sizes = MC_SIZES + (MC_LARGE if args.large else [])
        lg_shapes = LOGITS_SHAPES + (LOGITS_LARGE if args.large else [])
        head_mc, head_lg = HEAD_MC, HEAD_LOGITS

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        lat = _run("latency.py", ["--runs", "2" if args.quick else "3"])
        jobs = {
            "mc": ("bench_mc.py", _mc_args(head_mc, None, args.budget), None),
            "logits": ("bench_logits.py", _logits_args(head_lg, None, args.budget), None),
            "mc_1thread": ("bench_mc.py", _mc_args(head_mc, None, args.budget, peers=False), 1),
            "logits_1thread": ("bench_logits.py",
                               _logits_args(head_lg, None, args.budget, peers=False), 1),
            "mc_incache": ("bench_mc.py", _mc_args(cache_mc, None, args.budget, peers=False),
                           None),
            "logits_incache": ("bench_logits.py",
                               _logits_args(cache_lg, None, args.budget, peers=False), None),
        }
        rounds: dict = {k: [] for k in jobs}
        for _ in range(max(1, 1 if args.quick else args.rounds)):
            for key, (script, job_args, th) in jobs.items():
                rounds[key].append(_run(script, job_args, threads=th))
        best = {k: _best_of(v) for k, v in rounds.items()}
        head_mc_run, head_lg_run = best["mc"], best["logits"]
        one_mc, one_lg = best["mc_1thread"], best["logits_1thread"]
        cache_mc_run, cache_lg_run = best["mc_incache"], best["logits_incache"]
        half = _run("half_inputs.py", ["--n", f"{head_mc:g}", "--reps", "3" if args.quick
                                       else "5"], threads=threads)
        data = {
            "half": half,
            "latency": lat, "mc_1thread": one_mc, "logits_1thread": one_lg,
            "mc_incache": cache_mc_run, "logits_incache": cache_lg_run,
            "mc": [head_mc_run if s == head_mc else
                   _run("bench_mc.py", _mc_args(s, SWEEP_MC_OPS, args.budget))
                   for s in mc_sizes],
            "logits": [head_lg_run if tuple(s) == tuple(head_lg) else
                       _run("bench_logits.py", _logits_args(s, SWEEP_LOGITS_OPS, args.budget))
                       for s in lg_shapes],
            "wall_s": time.perf_counter() - t_start,
        }
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(data, f, indent=1)
    lat, mc_runs, lg_runs = data["latency"], data["mc"], data["logits"]
    one_mc, one_lg = data["mc_1thread"], data["logits_1thread"]
    # the headline runs: every op timed (the sweep times one op per size)
    head_mc_run = max(mc_runs, key=lambda r: len({x["op"] for x in r["rows"]}))
    head_lg_run = max(lg_runs, key=lambda r: len({x["op"] for x in r["rows"]}))

    info = head_mc_run["machine"]
    stamp = _common.stamp(info)
    png = os.path.join(args.out, "throughput.png")
    has_plot = plot(mc_runs, lg_runs, stamp, png)

    def lg_label(r):
        return f"{r['shape'][0]} x {r['shape'][1]}"

    def mc_label(r):
        return f"{r['size']:.0e}"

    md = [
        "# fastkl benchmark report",
        "",
        f"Machine: {stamp}.",
        f"Generated by `python bench/report.py{' --quick' if args.quick else ''}"
        f"{' --large' if args.large else ''}` in {data.get('wall_s', float('nan')):.0f} s; every "
        "number below is from that one run (best of several calls; the headline, 1-thread and "
        f"in-cache tables keep each row's fastest of {head_mc_run.get('rounds', 1)} rounds run "
        "minutes apart, the same for every implementation; load average at the start "
        f"{info.get('load_avg', float('nan')):.2f}). Ratios are side by side on the same "
        "arrays; every implementation's result was checked against the float64 reference "
        "before it was timed.",
        "",
        f"## Monte Carlo estimators: {head_mc_run['size']:,} {head_mc_run['dtype']} pairs",
        "",
        _table(head_mc_run),
        f"## Full-vocabulary ops: {head_lg_run['shape']} "
        f"{head_lg_run['dtype']}",
        "",
        _table(head_lg_run),
    ]
    if has_plot:
        md += ["## Throughput vs size", "", "![throughput](throughput.png)", ""]
    md += [
        f"### kl_mc {SWEEP_MC_OPS} mean (float32) across sizes", "",
        _sweep_table(mc_runs, SWEEP_MC_OPS, mc_label),
        "### kl_logits (float32) across sizes", "",
        _sweep_table(lg_runs, SWEEP_LOGITS_OPS, lg_label),
        "Time grows linearly with the size once the call overhead (a few microseconds of "
        "validation and dispatch, plus waking the thread pool) is amortised: below about 1e5 "
        "elements the ns/element column is dominated by that fixed cost; above the last-level "
        "cache the kernels run at their compute or memory limit.",
        "",
        f"## Thread scaling: 1 vs {threads} threads (fastkl backends)", "",
        f"kl_mc ops, {head_mc_run['size']:,} pairs:", "",
        _scaling_table(one_mc, head_mc_run, threads),
        f"Logits ops, {head_lg_run['shape']}:", "",
        _scaling_table(one_lg, head_lg_run, threads),
    ]
    if "mc_incache" in data:
        cm, cl = data["mc_incache"], data["logits_incache"]
        md += [
            "## Compute limit: the same ops on cache-resident inputs", "",
            f"Each fastkl op timed again on {cm['size']:,} pairs and on {tuple(cl['shape'])} "
            f"logits ({threads} threads): inputs that stay in the last-level cache, so the "
            "time is the kernels' arithmetic with the DRAM traffic taken away. Both GB/s "
            "columns are divided by the headline run's DRAM roofline: the in-cache percentage "
            "is the most of the roofline this arithmetic can reach on this CPU (a value below "
            "a target means the target needs cheaper arithmetic, not better memory access; "
            "above 100%, memory is the limit).", "",
            f"kl_mc ops ({head_mc_run['size']:,} pairs vs {cm['size']:,} in cache):", "",
            _incache_table(head_mc_run, cm),
            f"Logits ops ({tuple(head_lg_run['shape'])} vs {tuple(cl['shape'])} in cache):", "",
            _incache_table(head_lg_run, cl),
        ]
    if "half" in data:
        hf = data["half"]
        md += [
            "## 16-bit inputs read in place", "",
            f"`kl_mc` k3 mean over {hf['n']:,} pairs of float16 and bfloat16 log-probs "
            f"(`ml_dtypes`), {hf['threads']} threads, median of {hf['reps']} interleaved "
            "repetitions, against float32 arrays holding the same (widened) values; each "
            "result was first checked equal to the float32 one. The kernels widen each "
            "element in registers: no converted copy of the input.", "",
            half_inputs.table(hf["rows"]),
        ]
    md += [
        "## Import time and first-call latency (fresh processes)", "",
        _latency_table(lat),
        "The numba rows include loading the kernels from numba's on-disk cache (the first run "
        "after an install compiles them and is slower).",
        "",
    ]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(args.out, 'report.md')}"
          + (f", {png}" if has_plot else " (no plot: matplotlib is not installed)"))
    bad = _common.failures(head_mc_run) + _common.failures(head_lg_run)
    if "mc_incache" in data:
        bad += _common.failures(data["mc_incache"]) + _common.failures(data["logits_incache"])
    if bad:
        print("FAILED: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
