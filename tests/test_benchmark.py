"""The benchmark's code paths on tiny shapes: every case x mode x variant lands in the CSV with a positive
time, the plots are written, and benchmarks/make_results.py renders the CSV; the GPU profile's path
(--dry-run: do_bench rounds, the child-process torch.compile variants, the roofline floors, the target
ratios, the JSON and the log lines gpu_check.sh greps) on the CPU."""
import contextlib
import csv
import importlib.util
import io
import json
import os
import re
import time

import pytest
import torch

from convmixer_kernels import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {"dw_block", "pointwise", "stem"}
ALL_MODES = {"eval", "train", "train_fwd", "train_bwd"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", os.path.join(ROOT, "benchmarks", "make_results.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _main_one_thread(argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is faster and steadier on a busy machine
    try:
        return benchmark.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = _main_one_thread(["--tiny", "--reps", "2", "--warmup", "1", "--no-compile", "--peers", "none", "--out",
                           str(out), "--cases", "dw,pw,stem,layer,model,model768", "--dtypes", "fp32"])
    assert rc == 0
    return out


def test_csv_has_every_op_mode_variant(tiny_run):
    rows = _rows(tiny_run / "bench_cpu.csv")
    assert rows and set(rows[0]) == set(benchmark.CSV_FIELDS)
    variants = {"eager_nchw", "eager_channels_last", "fused_cpu"}
    got = {(r["op"], r["mode"], r["variant"]) for r in rows}
    for op in OPS:
        for mode in ALL_MODES:
            for v in variants:
                assert (op, mode, v) in got, (op, mode, v)
    for op in ("mixer_layer", "convmixer_256_8", "convmixer_768_32"):
        for mode in ("eval", "train"):
            for v in variants:
                assert (op, mode, v) in got, (op, mode, v)
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0 and float(r["min_ms"]) > 0
        assert int(r["reps"]) == 2
        assert r["direction"] == benchmark.DIRECTION[r["mode"]]
        assert r["dtype"] == "fp32" and r["peak_mem_bytes"] == ""  # CPU: no peak memory
        assert int(r["flops"]) > 0 and int(r["bytes"]) > 0 and float(r["gflops_per_s"]) > 0
        assert float(r["gemm_gflops"]) > 0 and float(r["copy_gbs"]) > 0
        assert r["timer"] == "call" and float(r["first_call_s"]) > 0
        assert r["shape"] == ("cpu" if r["kind"] != "model" else {"convmixer_256_8": "256/8",
                                                                   "convmixer_768_32": "768/32"}[r["op"]])
        # the roofline columns on the CPU too (the FMA ceiling there is the fp32 GEMM rate)
        assert int(r["floor_bytes"]) > 0 and float(r["floor_ms"]) > 0 and float(r["fma_gflops"]) > 0
        assert float(r["frac_floor"]) == pytest.approx(float(r["floor_ms"]) / float(r["median_ms"]), rel=2e-3)
        assert float(r["frac_floor_fma"]) > 0 and float(r["gb_per_s"]) > 0
        assert r["backend"] == ("cpu" if r["variant"] == "fused_cpu" else "eager")
        if r["mode"] in benchmark.TRAIN_MODES:
            assert int(r["saved_bytes"]) > 0
        else:
            assert r["saved_bytes"] == ""
        assert (r["img_per_s"] != "") == (r["kind"] == "model")
    # the fused blocks save less for the backward than eager does
    saved = {(r["op"], r["variant"]): int(r["saved_bytes"]) for r in rows if r["mode"] == "train"}
    for op in ("dw_block", "pointwise", "mixer_layer", "convmixer_256_8"):
        assert saved[(op, "fused_cpu")] < saved[(op, "eager_nchw")], op


def test_plots_written(tiny_run):
    pytest.importorskip("matplotlib")
    for name in ("speedup_cpu.png", "roofline_cpu.png"):
        p = tiny_run / name
        assert p.exists() and p.stat().st_size > 10_000, name


def test_speedup_plot_without_its_baseline_is_skipped(tmp_path, capsys):
    # --variants without eager_nchw: no speed-up to plot (it raised from matplotlib's legend before)
    pytest.importorskip("matplotlib")
    results = [benchmark.Result(case="c", mode="train", variant=v, median_ms=ms, dtype="fp32")
               for v, ms in (("eager_channels_last", 2.0), ("fused_cpu", 1.0))]
    assert benchmark.plot_speedups(results, str(tmp_path / "s.png")) is None
    assert not (tmp_path / "s.png").exists()
    assert "speed-up plot skipped" in capsys.readouterr().out
    results.append(benchmark.Result(case="c", mode="train", variant="eager_nchw", median_ms=3.0, dtype="fp32"))
    assert benchmark.plot_speedups(results, str(tmp_path / "s.png")) == str(tmp_path / "s.png")


def test_make_results_renders(tiny_run):
    text = _make_results().report(str(tiny_run / "bench_cpu.csv"))
    assert "### Per-op microbenchmarks" in text and "### Layer and whole models" in text
    for op in ("dw_block", "pointwise", "stem", "convmixer_256_8"):
        assert op in text
    assert "train_bwd" in text and "| target | measured | verdict |" in text
    assert "depthwise block train >= 3x eager NCHW" in text
    assert "Not measured" not in text


def test_compile_variants_dtypes_layouts(tmp_path):
    # both torch.compile variants through the fast aot_eager backend (the code path, not inductor's speed),
    # fp32 and bf16, the NCHW fused layout, and a backend that cannot run here (reported, left out)
    rc = _main_one_thread(["--tiny", "--reps", "1", "--warmup", "1", "--out", str(tmp_path), "--cases", "dw",
                           "--modes", "eval,train_bwd", "--compile-modes", "default,max-autotune",
                           "--compile-backend", "aot_eager", "--fused-layouts", "channels_last,nchw",
                           "--backends", "cpu,cuda", "--dtypes", "fp32,bf16"])
    assert rc == 0
    rows = _rows(tmp_path / "bench_cpu.csv")
    got = {(r["dtype"], r["mode"], r["variant"]) for r in rows}
    for dt in ("fp32", "bf16"):
        for mode in ("eval", "train_bwd"):
            for v in ("eager_nchw", "eager_channels_last", "torch_compile", "torch_compile_max_autotune",
                      "fused_cpu", "fused_cpu_nchw"):
                assert (dt, mode, v) in got
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    assert {r["gemm_gflops"] != "" for r in rows} == {True}  # a ceiling per dtype
    assert not any("cuda" in r["variant"] for r in rows)
    assert {r["layout"] for r in rows if r["variant"] == "fused_cpu_nchw"} == {"nchw"}


def test_cpu_peers_in_eval_rows(tmp_path):
    # the CPU runtimes as variants: eval rows only, each checked against the eager output (its note), bf16
    # rows included; torch_compile_freezing through aot_eager (the code path, not inductor's speed)
    pytest.importorskip("onnxruntime", reason="the onnxruntime peer (requirements.txt)")
    pytest.importorskip("openvino", reason="the openvino peer (requirements.txt)")
    pytest.importorskip("onnx", reason="the ONNX export (requirements.txt)")
    rc = _main_one_thread(["--tiny", "--reps", "1", "--warmup", "1", "--out", str(tmp_path), "--cases", "dw,model",
                           "--modes", "eval,train", "--dtypes", "fp32,bf16", "--compile-backend", "aot_eager",
                           "--no-plots"])
    assert rc == 0
    rows = _rows(tmp_path / "bench_cpu.csv")
    peers = [r for r in rows if r["variant"] in ("torch_compile_freezing", "onnxruntime", "openvino")]
    assert {(r["op"], r["dtype"], r["variant"]) for r in peers} == {
        (op, dt, p) for op in ("dw_block", "convmixer_256_8") for dt in ("fp32", "bf16")
        for p in ("torch_compile_freezing", "onnxruntime", "openvino")}
    for r in peers:
        assert r["mode"] == "eval" and r["status"] == "ok" and float(r["median_ms"]) > 0, r
        dev, scale = map(float, re.search(r"max \|y - eager\| (\S+) \(\|y\| <= (\S+)\)", r["note"]).groups())
        assert dev <= (1e-5 if r["dtype"] == "fp32" else 0.05) * scale + 1e-6, r
    assert {r["note"].split(";")[0] for r in peers if r["dtype"] == "bf16" and r["variant"] == "onnxruntime"} == {
        "runs fp32 (its CPU provider has no bf16 convolutions)"}
    # the summary's "best other" may name a peer; make_results puts them in the targets
    text = _make_results().report(str(tmp_path / "bench_cpu.csv"))
    assert "ConvMixer-256/8 eval bf16 >= 1.0x the fastest CPU runtime" in text


def test_cpu_peer_missing_or_wrong_is_reported(monkeypatch):
    import sys
    from convmixer_kernels import cpu_peers
    eager = benchmark.build_cases("cpu", tiny=True)["model"].build().eval()
    x = torch.randn(1, 3, 16, 16)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    v = benchmark.make_peer_variant("openvino", eager, x, log=lambda s: None)
    assert v.error and v.error.startswith("skipped: openvino not installed")
    # a runtime that computes something else is an error, not a time
    wrong = eager(x).detach() + 1
    monkeypatch.setattr(cpu_peers, "build_peer", lambda *a, **k: (lambda: wrong))
    v = benchmark.make_peer_variant("onnxruntime", eager, x, log=lambda s: None)
    assert v.error and v.error.startswith("error: output differs from eager"), v.error
    ap = benchmark.make_parser()
    with pytest.raises(ValueError, match="--peers: unknown"):
        benchmark.settings(ap.parse_args(["--device", "cpu", "--peers", "tensorrt"]))
    with pytest.raises(ValueError, match="CPU runtimes"):
        benchmark.settings(ap.parse_args(["--device", "cuda", "--peers", "onnxruntime"]))
    assert benchmark.settings(ap.parse_args(["--device", "cpu", "--no-compile"])).peers == ["onnxruntime", "openvino"]
    assert benchmark.settings(ap.parse_args(["--device", "cuda"])).peers == []
    # the untimed pause before each timed call: on the CPU when a peer runtime is among the variants (ONNX
    # Runtime's threads spin after its calls), unless --settle-ms sets it; none otherwise
    peer = benchmark.Variant("onnxruntime", "onnxruntime", "nchw", None, None, call=lambda: None)
    plain = benchmark.Variant("eager_nchw", "eager", "nchw", None, None)
    cpu = benchmark.settings(ap.parse_args(["--device", "cpu"]))
    assert benchmark._settle_s([plain, peer], cpu) == 0.25 and benchmark._settle_s([plain], cpu) == 0.0
    assert benchmark._settle_s([plain, peer], benchmark.settings(ap.parse_args(["--device", "cpu", "--settle-ms",
                                                                                "40"]))) == 0.04
    assert benchmark._settle_s([plain, peer], benchmark.settings(ap.parse_args(["--device", "cuda"]))) == 0.0


def test_counts():
    # dw block 2x4x5x5 k3: forward 2*9*200 FLOPs; backward dx + dw: twice that; all of it depthwise
    f, b, fe, be, dwf, dwb = benchmark._dw_counts(2, 4, 5, 5, 3)
    assert (f, b) == (3600, 7200) and fe == 2 * 200 + 4 * 9 + 4 and be == 3 * 200 + 2 * (4 * 9 + 4)
    assert (dwf, dwb) == (f, b)
    # stem 1x3x8x8 p2 -> 5: M = 16, K = 12; no dx; no depthwise FLOPs
    c = benchmark._cab_counts(1, 3, 8, 8, 5, 2, dx=False)
    assert c.fwd_flops == c.bwd_flops == 2 * 16 * 12 * 5 and c.dw_fwd_flops == c.dw_bwd_flops == 0
    layer = benchmark._sum_counts(benchmark._dw_counts(2, 4, 5, 5, 3), benchmark._cab_counts(2, 4, 5, 5, 4, 1))
    assert layer.dw_fwd_flops == 3600 and layer.fwd_flops == 3600 + 2 * 50 * 4 * 4


def _floor_closed_form(block, n, dim, hw, k, e, mode):
    """The GPU floors as the former benchmarks/bench_gpu.py counted them, written out: x in + y out +
    weights (+ BN's 4 fp32 arrays); training: forward x, y, w; backward dy, x in, dx and weight grads out."""
    act = n * dim * hw * hw
    w = {"dw": dim * k * k + dim, "pw": dim * dim + dim, "layer": dim * k * k + dim * dim + 2 * dim}[block]
    bn = {"dw": 1, "pw": 1, "layer": 2}[block] * dim * 4 * 4
    dw_fl = 2 * k * k * act if block in ("dw", "layer") else 0
    pw_fl = 2 * act * dim if block in ("pw", "layer") else 0
    if mode == "eval":
        return 2 * act * e + w * e + bn, dw_fl + pw_fl, dw_fl
    return 5 * act * e + 3 * w * e + 2 * bn, 3 * (dw_fl + pw_fl), 3 * dw_fl


def _cases(st):
    return {(c.key, c.shape): c for c in st.cases}


def test_cuda_defaults_resolve_without_a_gpu():
    # the CUDA profile (what gpu_check.sh runs, with its options)
    ap = benchmark.make_parser()
    argv = ["--device", "cuda", "--gpu-batch", "8", "--out", "x", "--budget-s", "200", "--compile-timeout-s", "60",
            "--tune", "1", "--no-plots"]
    st = benchmark.settings(ap.parse_args(argv))
    assert st.profile == "cuda" and st.timer == "do_bench" and st.reps == 2 and st.warmup == 1
    assert st.dtypes == ["bf16", "fp16"] and st.compile_modes == ["default", "max-autotune"]
    assert st.subprocess_variants == ["torch_compile", "torch_compile_max_autotune"] and st.compile_rows == "targets"
    assert st.keys == ["dw", "pw", "layer"] and st.modes == ["eval", "train"] and st.shapes == ["1536/20", "768/32"]
    c = _cases(st)
    assert list(c) == [(k, s) for s in ("1536/20", "768/32") for k in ("dw", "pw", "layer")]
    assert c[("dw", "1536/20")].input_shape == (8, 1536, 32, 32) and c[("dw", "768/32")].input_shape == (8, 768, 32, 32)
    assert "k9" in c[("dw", "1536/20")].name and "k7 relu" in c[("dw", "768/32")].name
    st = benchmark.settings(ap.parse_args(["--device", "cuda", "--gpu-batch", "8", "--cases", "stem,model768,model1536",
                                           "--shapes", "1536/20"]))
    c = _cases(st)
    assert c[("stem", "1536/20")].input_shape == (8, 3, 224, 224)
    assert c[("model768", "768/32")].input_shape == (8, 3, 224, 224) and c[("model1536", "1536/20")].batch == 8
    assert "k7 p7 relu" in c[("model768", "768/32")].name and "k9 p7" in c[("model1536", "1536/20")].name
    # the CPU profile
    cpu = benchmark.settings(ap.parse_args(["--device", "cpu"]))
    assert cpu.profile == "cpu" and cpu.timer == "call" and cpu.reps == 7 and cpu.subprocess_variants == []
    assert cpu.dtypes == ["fp32", "bf16"] and cpu.compile_modes == ["default"] and "model1536" not in cpu.keys
    assert cpu.keys == ["dw", "pw", "stem", "layer", "model", "model768"] and cpu.modes == []
    assert cpu.compile_rows == "all" and cpu.peers == ["torch_compile_freezing", "onnxruntime", "openvino"]
    assert cpu.case_modes(cpu.cases[0], "bf16") == ["eval"] and len(cpu.case_modes(cpu.cases[0], "fp32")) == 4
    c = _cases(cpu)
    assert c[("dw", "cpu")].input_shape == (32, 256, 16, 16) and c[("stem", "cpu")].input_shape == (32, 3, 32, 32)
    assert c[("model", "256/8")].input_shape == (64, 3, 32, 32)
    cpu = benchmark.settings(ap.parse_args(["--device", "cpu", "--cases", "model1536"]))
    assert cpu.cases[0].batch == 2
    # the dry run: the CUDA profile on the CPU, tiny, no torch.compile unless asked for
    dry = benchmark.settings(ap.parse_args(["--dry-run"]))
    assert (dry.device, dry.profile, dry.tiny, dry.timer, dry.compile_modes) == ("cpu", "cuda", True, "do_bench", [])
    assert _cases(dry)[("dw", "768/32")].input_shape == (2, 8, 6, 6)
    for bad in (["--modes", "backward"], ["--shapes", "1024/20"], ["--cases", "stem2"]):
        with pytest.raises(ValueError):
            benchmark.settings(ap.parse_args(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so(tmp_path, capsys):
    assert benchmark.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # the GPU profile's code path on the CPU, through the package entry point: do_bench rounds (emulated),
    # torch.compile (aot_eager: the code path, not inductor's speed) in child processes on the target rows
    out = tmp_path_factory.mktemp("dry")
    from convmixer_kernels.__main__ import main as cli
    buf = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            rc = cli(["bench", "--dry-run", "--dtypes", "bf16", "--rep-ms", "5", "--compile-modes", "default",
                      "--compile-backend", "aot_eager", "--no-plots", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, buf.getvalue()[-3000:]
    return out, buf.getvalue()


def test_dry_run_rows_and_floors(dry_run):
    out, _ = dry_run
    rows = _rows(out / "bench_cpu.csv")
    ceil = json.loads((out / "bench_cpu.json").read_text())["ceilings"]
    assert set(rows[0]) == set(benchmark.CSV_FIELDS)
    blocks = {"dw_block": "dw", "pointwise": "pw", "mixer_layer": "layer"}
    got = {(r["op"], r["shape"], r["mode"], r["variant"]): r for r in rows}
    for op in blocks:
        for shape in ("1536/20", "768/32"):
            for mode in ("eval", "train"):
                for v in ("eager_nchw", "eager_channels_last", "fused_cpu"):
                    assert (op, shape, mode, v) in got, (op, shape, mode, v)
    assert {r["op"] for r in rows} == set(blocks) and {r["mode"] for r in rows} == {"eval", "train"}
    gemm, copy_gbs, fma = ceil["gemm_gflops"]["bf16"], ceil["copy_gbs"], ceil["fma_gflops"]
    assert gemm > 0 and copy_gbs > 0 and fma > 0
    for r in rows:
        assert r["status"] == "ok", r
        assert r["timer"] == "do_bench" and int(r["reps"]) == 2 and r["dtype"] == "bf16"
        ms = float(r["median_ms"])
        n, dim, hw, k, _, _ = benchmark.TINY_SHAPES[r["shape"]]
        fb, fl, dwf = _floor_closed_form(blocks[r["op"]], n, dim, hw, k, 2, r["mode"])
        assert (int(r["floor_bytes"]), int(r["flops"])) == (fb, fl), r
        floor = max(fb / (copy_gbs * 1e6), fl / (gemm * 1e6))
        floor_fma = max(fb / (copy_gbs * 1e6), dwf / (fma * 1e6) + (fl - dwf) / (gemm * 1e6))
        assert float(r["floor_ms"]) == pytest.approx(floor, rel=1e-4)
        assert float(r["frac_floor"]) == pytest.approx(floor / ms, rel=2e-3)
        assert float(r["floor_fma_ms"]) == pytest.approx(floor_fma, rel=1e-4)
        assert float(r["frac_floor_fma"]) == pytest.approx(floor_fma / ms, rel=2e-3)
        assert float(r["gb_per_s"]) == pytest.approx(fb / ms / 1e6, rel=2e-3)
    # torch.compile only on the two target rows, each measured alone in a child process
    compiled = {(r["op"], r["shape"], r["mode"]) for r in rows if r["variant"] == "torch_compile"}
    assert compiled == {("dw_block", "1536/20", "eval"), ("mixer_layer", "1536/20", "train")}
    for r in rows:
        assert ("child process" in r["note"]) == (r["variant"] == "torch_compile")
    # the target rows come first (a budget cut keeps them)
    ops = [r["op"] for r in rows]  # dw: eval 3 + 1 child, train 3; the layer: eval 3, train 3 + 1 child
    assert ops[:7] == ["dw_block"] * 7 and ops[7:14] == ["mixer_layer"] * 7


def test_dry_run_json_and_log(dry_run):
    out, log = dry_run
    meta = json.loads((out / "bench_cpu.json").read_text())
    assert meta["profile"] == "cuda" and meta["dry_run"] and meta["timer"] == "do_bench"
    t = meta["targets"]
    dw, layer = t["dw_eval_bf16_1536/fused_cpu"], t["layer_train_bf16_1536/fused_cpu"]
    assert dw["ms"] > 0 and dw["frac_floor"] > 0 and dw["frac_floor_fma"] > 0
    ms = {(r["op"], r["mode"], r["variant"]): float(r["median_ms"]) for r in _rows(out / "bench_cpu.csv")
          if r["shape"] == "1536/20"}
    assert dw["ms"] == pytest.approx(ms[("dw_block", "eval", "fused_cpu")], rel=1e-3, abs=1e-4)
    assert dw["vs_compile_default"] == pytest.approx(ms[("dw_block", "eval", "torch_compile")] / dw["ms"], rel=2e-3)
    assert dw["vs_eager_nchw"] == pytest.approx(ms[("dw_block", "eval", "eager_nchw")] / dw["ms"], rel=2e-3)
    assert dw["vs_compile_max_autotune"] is None  # not measured (--compile-modes default)
    assert layer["vs_eager_nchw"] > 0 and layer["vs_eager_cl"] > 0 and layer["frac_floor"] > 0
    assert meta["winners"]["dw_block"] == {"winner": None, "reason": "no GPU backend measured"}
    # what benchmarks/gpu_check.sh's summary greps out of bench.log
    lines = log.splitlines()
    assert [ln for ln in lines if re.match(r"^\[bench\] ceilings", ln)]
    i = lines.index("[bench] target ratios:")
    assert lines[i + 1].startswith("  dw_eval_bf16_1536/fused_cpu: ms=")
    assert any(ln.startswith("[bench] measured winners (for backends.CUDA_WINNERS): ") for ln in lines[i:])
    head = next(ln for ln in lines if "floor%" in ln)
    assert "fma%" in head and "GB/s" in head
    assert "[child] ready torch_compile" in log
    assert not list(out.glob("*.png"))  # --no-plots


def _res(op, shape, mode, variant, ms, **kw):
    return benchmark.Result(f"{op} {shape}", mode, variant, median_ms=ms, op=op, dtype="bf16", shape=shape, **kw)


def test_floors_targets_winners_logic():
    ceil = {"copy_gbs": 1000.0, "gemm_gflops": {"bf16": 500e3}, "fma_gflops": 50e3}
    r = _res("dw_block", "1536/20", "eval", "fused_triton", 2.0, flops=10 ** 9, dw_flops=10 ** 9, floor_bytes=10 ** 9)
    benchmark.add_floors([r], ceil)
    # memory: 1e9 B / 1000 GB/s = 1 ms; GEMM: 1e9 / 500 TFLOP/s = 2 us; FMA: 1e9 / 50 TFLOP/s = 20 us
    assert r.floor_ms == pytest.approx(1.0) and r.frac_floor == pytest.approx(0.5)
    r2 = _res("dw_block", "1536/20", "eval", "fused_cuda", 1.0, flops=10 ** 11, dw_flops=10 ** 11, floor_bytes=10 ** 6)
    benchmark.add_floors([r2], ceil)
    assert r2.floor_ms == pytest.approx(0.2) and r2.floor_fma_ms == pytest.approx(2.0)
    assert r2.frac_floor_fma == pytest.approx(2.0)
    rows = [r, r2, _res("dw_block", "1536/20", "eval", "eager_nchw", 8.0),
            _res("dw_block", "1536/20", "eval", "torch_compile_max_autotune", 4.0),
            _res("dw_block", "1536/20", "eval", "torch_compile", 6.0),
            _res("dw_block", "1536/20", "eval", "eager_channels_last", 16.0),
            _res("mixer_layer", "1536/20", "train", "fused_cuda", 2.0),
            _res("mixer_layer", "1536/20", "train", "eager_nchw", 3.0),
            _res("mixer_layer", "1536/20", "train", "eager_channels_last", 5.0),
            _res("pointwise", "768/32", "train", "fused_triton", 1.0),
            _res("pointwise", "768/32", "train", "fused_cuda", 4.0),
            _res("pointwise", "1536/20", "eval", "fused_triton", 1.0)]  # no cuda row: not counted
    t = benchmark.target_ratios(rows)
    assert t["dw_eval_bf16_1536/fused_triton"]["vs_eager_nchw"] == pytest.approx(4.0)
    assert t["dw_eval_bf16_1536/fused_cuda"]["vs_compile_max_autotune"] == pytest.approx(4.0)
    assert t["dw_eval_bf16_1536/fused_cuda"]["vs_compile_default"] == pytest.approx(6.0)
    assert t["dw_eval_bf16_1536/fused_cuda"]["frac_floor_fma"] == pytest.approx(2.0)
    assert t["layer_train_bf16_1536/fused_cuda"]["vs_eager_nchw"] == pytest.approx(1.5)
    assert t["layer_train_bf16_1536/fused_cuda"]["vs_eager_cl"] == pytest.approx(2.5)
    assert "layer_train_bf16_1536/fused_triton" not in t
    w = benchmark.winners(rows)
    assert w["dw_block"]["winner"] == "cuda" and w["dw_block"]["geomean_t_triton_over_t_cuda"] == pytest.approx(2.0)
    assert w["conv_act_bn"]["winner"] == "triton" and w["conv_act_bn"]["rows"] == 1
    assert benchmark.winners(rows[:1])["dw_block"] == {"winner": "triton", "reason": "only one GPU backend measured"}
    table = benchmark.format_table(rows)
    assert "floor%" in table and "fma%" in table and "50.0%" in table


def test_budget_and_do_bench_emulation():
    ap = benchmark.make_parser()
    st = benchmark.settings(ap.parse_args(["--dry-run", "--cases", "dw", "--shapes", "1536/20"]))
    st.deadline = time.time() - 1
    case = st.cases[0]
    spec = ("compile", "inductor", "nchw", "default")
    assert benchmark.run_child(case, "eval", "bf16", "torch_compile", spec, st, log=lambda s: None).status == \
        "skipped: budget"
    rs = benchmark.bench_case(case, ["eval"], "bf16", st, ["cpu"], log=lambda s: None)
    assert rs and {r.status for r in rs} == {"skipped: budget"}
    calls = []
    ms = benchmark._do_bench(lambda: calls.append(1), lambda: calls.append(0), None, "cpu", 1.0, 0.0)
    assert ms >= 0 and calls.count(1) >= 3 and calls.count(0) == calls.count(1)  # setup before every timed call
