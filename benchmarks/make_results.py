"""Writes the measured part of benchmarks/RESULTS.md from the benchmark CSVs (no hand-typed numbers).

    python benchmarks/make_results.py bench_out/bench_cpu.csv [more.csv ...] > benchmarks/results_cpu.md

Prints, per CSV: the machine, date and command it came from; a table per case and mode; and the
issue targets with the measured ratio and PASS/MISS.
"""
import csv
import sys
from collections import OrderedDict

# (case prefix, mode, description, kind, threshold): kind "eager" = fused vs eager NCHW,
# "best_other" = fused vs the better of eager channels_last and torch.compile, "saved" = saved bytes ratio.
CPU_TARGETS = [
    ("dw_block", "eval", "depthwise block eval >= 2.5x eager NCHW", "eager", 2.5),
    ("dw_block", "eval", "depthwise block eval >= 1.5x best of channels_last/compile", "best_other", 1.5),
    ("dw_block", "train", "depthwise block train >= 3x eager NCHW", "eager", 3.0),
    ("convmixer_256_8", "train", "ConvMixer-256/8 train >= 2x eager NCHW", "eager", 2.0),
    ("convmixer_256_8", "train", "ConvMixer-256/8 train >= 1.3x best of channels_last/compile", "best_other", 1.3),
    ("convmixer_256_8", "train", "ConvMixer-256/8 saved activations <= 50% of eager", "saved", 0.5),
    ("convmixer_256_8", "eval", "ConvMixer-256/8 eval >= 1.5x eager NCHW", "eager", 1.5),
    ("convmixer_256_8", "eval", "ConvMixer-256/8 eval >= 1.0x best of channels_last/compile", "best_other", 1.0),
]


def load(path):
    rows = list(csv.DictReader(open(path)))
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["case"], r["mode"]), {})[r["variant"]] = r
    return rows, groups


def best_fused(variants):
    fused = [v for k, v in variants.items() if k.startswith("fused")]
    return min(fused, key=lambda r: float(r["median_ms"])) if fused else None


def report(path):
    rows, groups = load(path)
    meta = rows[0]
    out = [f"Measured on `{meta['device']}`, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}, "
           f"{meta['reps']} interleaved repetitions per variant. Ceilings measured in the same run: fp32 GEMM "
           f"{meta.get('gemm_gflops', '?')} GFLOP/s, copy {meta.get('copy_gbs', '?')} GB/s (read + write).", "",
           f"Command: `{meta['command']}`", ""]
    out += ["| case | mode | variant | median ms | vs eager NCHW | saved MB | saved vs eager |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for (case, mode), variants in groups.items():
        base = variants["eager_nchw"]
        for name, r in variants.items():
            saved = f"{int(r['saved_bytes']) / 2**20:.1f}" if r["saved_bytes"] else "-"
            pct = (f"{100 * int(r['saved_bytes']) / int(base['saved_bytes']):.0f}%"
                   if r["saved_bytes"] and base["saved_bytes"] else "-")
            out.append(f"| {case} | {mode} | {name} | {float(r['median_ms']):.2f} | "
                       f"{float(r['speedup_vs_eager_nchw']):.2f}x | {saved} | {pct} |")
    if meta["device"].startswith("cpu"):
        out += ["", "Targets (fused = the faster of fused NCHW / fused channels_last in this run):", "",
                "| target | measured | verdict |", "| --- | ---: | --- |"]
        for prefix, mode, desc, kind, thr in CPU_TARGETS:
            key = next((k for k in groups if k[0].startswith(prefix) and k[1] == mode), None)
            if key is None:
                continue
            v = groups[key]
            f = best_fused(v)
            if kind == "eager":
                val = float(v["eager_nchw"]["median_ms"]) / float(f["median_ms"])
                ok, shown = val >= thr, f"{val:.2f}x ({f['variant']})"
            elif kind == "best_other":
                others = [v[k] for k in ("eager_channels_last", "torch_compile") if k in v]
                b = min(others, key=lambda r: float(r["median_ms"]))
                val = float(b["median_ms"]) / float(f["median_ms"])
                ok, shown = val >= thr, f"{val:.2f}x vs {b['variant']} ({f['variant']})"
            else:
                fs = [r for k, r in v.items() if k.startswith("fused") and r["saved_bytes"]]
                val = max(int(r["saved_bytes"]) for r in fs) / int(v["eager_nchw"]["saved_bytes"])
                ok, shown = val <= thr, f"{100 * val:.0f}%"
            out.append(f"| {desc} | {shown} | {'PASS' if ok else 'MISS'} |")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(report(p) for p in sys.argv[1:]))
