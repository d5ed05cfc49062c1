"""The benchmark's code path on tiny shapes: every case x mode x variant lands in the CSV with a positive
time, the plots are written, and benchmarks/make_results.py renders the CSV."""
import csv
import importlib.util
import os

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
    rc = _main_one_thread(["--tiny", "--reps", "2", "--warmup", "1", "--no-compile", "--out", str(out),
                           "--cases", "dw,pw,stem,layer,model,model768"])
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


def test_counts():
    # dw block 2x4x5x5 k3: forward 2*9*200 FLOPs; backward dx + dw: twice that
    f, b, fe, be = benchmark._dw_counts(2, 4, 5, 5, 3)
    assert (f, b) == (3600, 7200) and fe == 2 * 200 + 4 * 9 + 4 and be == 3 * 200 + 2 * (4 * 9 + 4)
    # stem 1x3x8x8 p2 -> 5: M = 16, K = 12; no dx
    f, b, _, _ = benchmark._cab_counts(1, 3, 8, 8, 5, 2, dx=False)
    assert f == b == 2 * 16 * 12 * 5


def test_cuda_defaults_resolve_without_a_gpu():
    ap = benchmark.make_parser()
    st = benchmark.settings(ap.parse_args(["--device", "cuda", "--gpu-batch", "8"]))
    assert st.dtypes == ["bf16"] and st.compile_modes == ["default", "max-autotune"]
    assert st.keys == ["dw", "pw", "stem", "layer", "model", "model768", "model1536"]
    c = st.cases
    assert c["dw"].input_shape == (8, 1536, 32, 32) and c["stem"].input_shape == (8, 3, 224, 224)
    assert c["model768"].input_shape == (8, 3, 224, 224) and c["model1536"].batch == 8
    assert "k7 p7 relu" in c["model768"].name and "k9 p7" in c["model1536"].name
    cpu = benchmark.settings(ap.parse_args(["--device", "cpu"]))
    assert cpu.dtypes == ["fp32"] and cpu.compile_modes == ["default"] and "model1536" not in cpu.keys
    assert cpu.cases["model"].input_shape == (64, 3, 32, 32) and cpu.cases["model1536"].batch == 2
    with pytest.raises(ValueError):
        benchmark.settings(ap.parse_args(["--modes", "backward"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so(tmp_path, capsys):
    assert benchmark.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
