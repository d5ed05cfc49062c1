"""Writes the measured part of benchmarks/RESULTS.md from the benchmark CSVs (no hand-typed numbers).

    python benchmarks/make_results.py bench_out/bench_cpu.csv [more.csv ...] > benchmarks/results_cpu.md

Prints, per CSV: the machine, date, command and ceilings it came from; the per-op microbenchmark table
(one row per op and mode, one column per variant); the layer and whole-model table (one row per variant,
with saved-activation bytes, peak memory on CUDA and images/s); variants that failed; and the issue
targets with the measured ratio and PASS/MISS. CSVs of the older format (no `kind` column) still render
as one table.
"""
import csv
import sys
from collections import OrderedDict

# (case prefix, mode, description, kind, threshold[, dtype (default fp32)[, peer dtypes (default fp32)]]):
# kind "eager" = fused vs eager NCHW, "best_other" = fused vs the better of eager channels_last and
# torch.compile, "saved" = saved bytes ratio, "best_peer" = fused vs the fastest CPU runtime (PEERS) of the case
# and mode in the rows of the peer dtypes.
CPU_TARGETS = [
    ("dw_block", "eval", "depthwise block eval >= 2.5x eager NCHW", "eager", 2.5),
    ("dw_block", "eval", "depthwise block eval >= 1.5x best of channels_last/compile", "best_other", 1.5),
    ("dw_block", "train", "depthwise block train >= 3x eager NCHW", "eager", 3.0),
    ("convmixer_256_8", "train", "ConvMixer-256/8 train >= 2x eager NCHW", "eager", 2.0),
    ("convmixer_256_8", "train", "ConvMixer-256/8 train >= 1.3x best of channels_last/compile", "best_other", 1.3),
    ("convmixer_256_8", "train", "ConvMixer-256/8 saved activations <= 50% of eager", "saved", 0.5),
    ("convmixer_256_8", "eval", "ConvMixer-256/8 eval >= 1.5x eager NCHW", "eager", 1.5),
    ("convmixer_256_8", "eval", "ConvMixer-256/8 eval >= 1.0x best of channels_last/compile", "best_other", 1.0),
    # best_peer targets: (..., dtype of the fused row, dtypes of the peer rows it is held against). The
    # issue's are against fp32 peers; a bf16 row also against the runtimes' own bf16 (ours, stricter).
    ("convmixer_256_8", "eval", "ConvMixer-256/8 eval fp32 >= 1.25x the fastest fp32 CPU runtime", "best_peer", 1.25),
    ("convmixer_256_8", "eval", "ConvMixer-256/8 eval bf16 >= 1.0x the fastest CPU runtime in bf16", "best_peer", 1.0,
     "bf16", ("bf16",)),
    ("convmixer_768_32", "eval", "ConvMixer-768/32 eval fp32 >= 1.0x the fastest fp32 CPU runtime", "best_peer", 1.0),
    ("convmixer_768_32", "eval", "ConvMixer-768/32 eval bf16 >= 1.6x the fastest fp32 CPU runtime", "best_peer", 1.6,
     "bf16"),
    ("convmixer_768_32", "eval", "ConvMixer-768/32 eval bf16 >= 1.0x the fastest CPU runtime in bf16", "best_peer",
     1.0, "bf16", ("bf16",)),
]
PEERS = ("torch_compile_freezing", "onnxruntime", "openvino")  # convmixer_kernels/cpu_peers.py
OTHER_BASELINES = ("eager_channels_last", "torch_compile", "torch_compile_max_autotune")


def ok(r):
    return r.get("status", "ok") in ("ok", "") and r.get("median_ms")


def ms(r):
    return float(r["median_ms"])


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["case"], r.get("dtype", ""), r["mode"]), OrderedDict())[r["variant"]] = r
    return rows, groups


def best_fused(variants):
    fused = [v for k, v in variants.items() if k.startswith("fused") and ok(v)]
    return min(fused, key=ms) if fused else None


def best_other(variants):
    others = [variants[k] for k in OTHER_BASELINES if k in variants and ok(variants[k])]
    return min(others, key=ms) if others else None


def mb(v):
    return f"{int(v) / 2**20:.1f}" if v not in (None, "") else "-"


def _header(rows, path):
    meta = rows[0]
    reps = OrderedDict()
    for r in rows:
        if ok(r):
            reps.setdefault(r.get("kind", ""), r["reps"])
    if len(set(reps.values())) == 1:
        rep_txt = next(iter(reps.values()))
    else:
        rep_txt = ", ".join(f"{v} ({k})" if k else v for k, v in reps.items()) or meta["reps"]
    ceil = OrderedDict()
    for r in rows:
        if r.get("gemm_gflops"):
            ceil.setdefault(r.get("dtype", "fp32") or "fp32", (r["gemm_gflops"], r.get("copy_gbs", "?")))
    ceil_txt = "; ".join(f"{d} GEMM {g} GFLOP/s, copy {c} GB/s (read + write)" for d, (g, c) in ceil.items())
    return [f"Measured on `{meta['device']}`, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}, "
            f"{rep_txt} interleaved repetitions per variant. Ceilings measured in the same run: {ceil_txt or '?'}.",
            "", f"Command: `{meta['command']}`", ""]


def _legacy_table(groups):
    out = ["| case | mode | variant | median ms | vs eager NCHW | saved MB | saved vs eager |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for (case, _, mode), variants in groups.items():
        base = variants.get("eager_nchw", {})
        for name, r in variants.items():
            if not ok(r):
                continue
            pct = (f"{100 * int(r['saved_bytes']) / int(base['saved_bytes']):.0f}%"
                   if r["saved_bytes"] and base.get("saved_bytes") else "-")
            out.append(f"| {case} | {mode} | {name} | {ms(r):.2f} | "
                       f"{float(r['speedup_vs_eager_nchw']):.2f}x | {mb(r['saved_bytes'])} | {pct} |")
    return out


def _micro_table(groups):
    """Per-op microbenchmarks: one row per (op, dtype, mode), a column per variant (median ms and
    speed-up vs eager NCHW), then the best fused variant's ratios and saved bytes."""
    keys = [k for k, v in groups.items() if next(iter(v.values())).get("kind") == "op"]
    if not keys:
        return []
    variants = list(OrderedDict.fromkeys(n for k in keys for n in groups[k]))
    out = ["### Per-op microbenchmarks", "",
           "Median ms (speed-up vs eager NCHW). train = forward + backward in one call; train_fwd = the "
           "training forward; train_bwd = the backward alone (after an untimed forward). Saved = saved-activation "
           "MB of the best fused variant / eager NCHW.", "",
           "| op | dtype | mode | " + " | ".join(variants) + " | best fused vs eager NCHW | vs best other | saved MB |",
           "| --- | --- | --- | " + " | ".join("---:" for _ in variants) + " | ---: | ---: | ---: |"]
    for k in keys:
        case, dtype, mode = k
        v = groups[k]
        base = v.get("eager_nchw")
        base_ms = ms(base) if base and ok(base) else None
        cells = []
        for n in variants:
            r = v.get(n)
            if r is None:
                cells.append("")
            elif not ok(r):
                cells.append("error")
            else:
                cells.append(f"{ms(r):.2f} ({base_ms / ms(r):.2f}x)" if base_ms else f"{ms(r):.2f}")
        f, o = best_fused(v), best_other(v)
        vs_e = f"{base_ms / ms(f):.2f}x ({f['variant']})" if f and base_ms else "-"
        vs_o = f"{ms(o) / ms(f):.2f}x vs {o['variant']}" if f and o else "-"
        saved = (f"{mb(f['saved_bytes'])} / {mb(base['saved_bytes'])}"
                 if f and base and f.get("saved_bytes") and base.get("saved_bytes") else "-")
        out.append(f"| {case} | {dtype} | {mode} | " + " | ".join(cells) + f" | {vs_e} | {vs_o} | {saved} |")
    return out + [""]


def _model_table(groups):
    keys = [k for k, v in groups.items() if next(iter(v.values())).get("kind") in ("layer", "model")]
    if not keys:
        return []
    cuda = any(r.get("peak_mem_bytes") for k in keys for r in groups[k].values())
    out = ["### Layer and whole models", "",
           "| case | dtype | mode | variant | median ms | vs eager NCHW | img/s | saved MB | saved vs eager |"
           + (" peak MB |" if cuda else ""),
           "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else "")]
    for k in keys:
        case, dtype, mode = k
        v = groups[k]
        base = v.get("eager_nchw", {})
        for name, r in v.items():
            if not ok(r):
                continue
            pct = (f"{100 * int(r['saved_bytes']) / int(base['saved_bytes']):.0f}%"
                   if r.get("saved_bytes") and base.get("saved_bytes") else "-")
            sp = f"{float(r['speedup_vs_eager_nchw']):.2f}x" if r.get("speedup_vs_eager_nchw") else "-"
            ips = f"{float(r['img_per_s']):.1f}" if r.get("img_per_s") else "-"
            out.append(f"| {case} | {dtype} | {mode} | {name} | {ms(r):.2f} | {sp} | {ips} | {mb(r.get('saved_bytes'))}"
                       f" | {pct} |" + (f" {mb(r.get('peak_mem_bytes'))} |" if cuda else ""))
    return out + [""]


def _targets(groups):
    out = ["Targets (fused = the fastest fused variant in this run; fp32 unless the target says otherwise):", "",
           "| target | measured | verdict |", "| --- | ---: | --- |"]
    for prefix, mode, desc, kind, thr, *dt in CPU_TARGETS:
        dtypes = ("", "fp32") if not dt or dt[0] == "fp32" else (dt[0],)
        peer_dtypes = dt[1] if len(dt) > 1 else ("fp32",)
        key = next((k for k in groups if k[0].startswith(prefix) and k[2] == mode and k[1] in dtypes), None)
        if key is None:
            continue
        v = groups[key]
        f, base = best_fused(v), v.get("eager_nchw")
        if f is None or base is None or not ok(base):
            out.append(f"| {desc} | not measured | - |")
            continue
        if kind == "eager":
            val = ms(base) / ms(f)
            good, shown = val >= thr, f"{val:.2f}x ({f['variant']})"
        elif kind == "best_peer":
            peers = [r for k, g in groups.items() if k[0] == key[0] and k[2] == mode and k[1] in peer_dtypes
                     for n, r in g.items() if n in PEERS and ok(r)]
            if not peers:
                out.append(f"| {desc} | no CPU runtime measured | - |")
                continue
            b = min(peers, key=ms)
            val = ms(b) / ms(f)
            good, shown = val >= thr, f"{val:.2f}x vs {b['variant']} in the {b.get('dtype')} row ({f['variant']})"
        elif kind == "best_other":
            b = best_other(v)
            if b is None:
                out.append(f"| {desc} | no channels_last/compile row | - |")
                continue
            val = ms(b) / ms(f)
            good, shown = val >= thr, f"{val:.2f}x vs {b['variant']} ({f['variant']})"
        else:
            fs = [r for k, r in v.items() if k.startswith("fused") and ok(r) and r.get("saved_bytes")]
            if not fs or not base.get("saved_bytes"):
                out.append(f"| {desc} | not measured | - |")
                continue
            val = max(int(r["saved_bytes"]) for r in fs) / int(base["saved_bytes"])
            good, shown = val <= thr, f"{100 * val:.0f}%"
        out.append(f"| {desc} | {shown} | {'PASS' if good else 'MISS'} |")
    return out


def report(path):
    rows, groups = load(path)
    if not rows:
        return f"{path}: no rows"
    out = _header(rows, path)
    if "kind" in rows[0]:
        out += _micro_table(groups) + _model_table(groups)
        failed = [r for r in rows if not ok(r)]
        if failed:
            out += ["Not measured:", ""] + [f"- {r['case']} {r.get('dtype', '')} {r['mode']} {r['variant']}: "
                                             f"{r.get('status') or 'no time'}" for r in failed] + [""]
    else:
        out += _legacy_table(groups) + [""]
    if rows[0]["device"].startswith("cpu"):
        out += _targets(groups)
    return "\n".join(out).rstrip()


if __name__ == "__main__":
    print("\n\n".join(report(p) for p in sys.argv[1:]))
