"""The CPU GEMM routes at ConvMixer's pointwise shapes (issue 12), interleaved in one process, median ms:
at::mm (MKL), oneDNN's matmul as the CPU backend calls it (mkldnn::_linear_pointwise, with and without the
activation post-op) and our own GEMM (csrc/cpu/sgemm.cpp, with and without its epilogue), for the forward
Z W^T and the backward's dZ = dT W and dW = dT^T Z.

--peers adds the forward as the peer runtimes run it: MKL's packed GEMM (mkl::_mkl_linear, inductor's fp32
route under freezing) and ONNX Runtime's MatMul + Add + Relu (MLAS), in its default configuration (its
worker threads spin after each call). --settle-ms pauses before each timed call (untimed): with ONNX Runtime
among the routes and no pause, the route timed after it ran at half its rate on a 2-core VM
(benchmarks/RESULTS.md), which is why `bench` pauses by default when a peer runtime is among its variants.

    python benchmarks/cpu_gemm_rates.py [--threads 2] [--reps 15] [--peers] [--settle-ms 0]
"""
import argparse
import statistics
import time

import torch

from convmixer_kernels import _C

SHAPES = {"768/32 (M=2048, C=768)": (2048, 768), "256/8 (M=16384, C=256)": (16384, 256),
          "1536/20 (M=2048, C=1536)": (2048, 1536)}


def peer_routes(M, C, x, w, b, threads):
    """The forward (bias, ReLU) through MKL's packed GEMM and through ONNX Runtime (skipped if absent)."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, M)
    routes = {"fwd MKL packed + relu (inductor fp32)":
              lambda: torch.relu_(torch.ops.mkl._mkl_linear(x, packed, w, b, M))}
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        print("onnxruntime or onnx not installed: its route is skipped")
        return routes
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["t"]), helper.make_node("Add", ["t", "b"], ["u"]),
         helper.make_node("Relu", ["u"], ["y"])], "pointwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, C])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "wt"), numpy_helper.from_array(b.numpy(), "b")])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    routes["fwd ONNX Runtime MatMul + Add + Relu (MLAS)"] = lambda: sess.run(None, {"x": xn})
    return routes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--peers", action="store_true", help="also MKL's packed GEMM and ONNX Runtime's MatMul")
    ap.add_argument("--settle-ms", type=float, default=0.0, help="untimed pause before each timed call")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lp = torch.ops.mkldnn._linear_pointwise
    for name, (M, C) in SHAPES.items():
        x, w, b, dT = torch.randn(M, C), torch.randn(C, C), torch.randn(C), torch.randn(M, C)
        fs = {"fwd at::mm": lambda: torch.mm(x, w.t()),
              "fwd oneDNN": lambda: lp(x, w, b, "none", [], ""),
              "fwd oneDNN + gelu post-op": lambda: lp(x, w, b, "gelu", [], "none"),
              "fwd oneDNN + relu post-op": lambda: lp(x, w, b, "relu", [], ""),
              "fwd own": lambda: _C.cpu_sgemm_nt(x, w, b),
              "fwd own + gelu epilogue": lambda: _C.cpu_sgemm_nt(x, w, b, 0),
              "fwd own + relu epilogue": lambda: _C.cpu_sgemm_nt(x, w, b, 2),
              "dZ at::mm": lambda: torch.mm(dT, w),
              "dZ own (W^T read in place)": lambda: _C.cpu_sgemm_nt(dT, w.t()),
              "dZ oneDNN": lambda: lp(dT, w.t().contiguous(), None, "none", [], ""),
              "dW at::mm": lambda: torch.mm(dT.t(), x),
              "dW oneDNN (transposed copies)":
                  lambda: lp(dT.t().contiguous(), x.t().contiguous(), None, "none", [], "")}
        if a.peers:
            fs.update(peer_routes(M, C, x, w, b, a.threads))
        times = {n: [] for n in fs}
        for f in fs.values():
            f()
            f()
        for _ in range(a.reps):
            for n, f in fs.items():
                time.sleep(a.settle_ms / 1e3)
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
        print(f"\n{name}, fp32, {a.threads} threads, settle {a.settle_ms:g} ms\n| GEMM | ms | GFLOP/s |\n"
              "| --- | ---: | ---: |")
        for n, v in times.items():
            m = statistics.median(v)
            print(f"| {n} | {m * 1e3:.2f} | {2 * M * C * C / m / 1e9:.1f} |")


if __name__ == "__main__":
    main()
