"""Fused CPU models against the runtimes CPU users pick (issue 12): eval, fp32, NCHW input, the same
thread count for every runtime, interleaved repetitions in one process, median ms.

Peers: eager PyTorch (NCHW and channels_last), torch.compile with inductor freezing, ONNX Runtime (CPU EP,
all graph optimizations) and OpenVINO (CPU, LATENCY hint, f32 precision), the last two from an ONNX export
of the unfused paper model. A peer whose package is missing is reported as skipped.

    python benchmarks/cpu_peers.py [--threads 2] [--reps 5] [--models 256/8,768/32] [--no-compile] [--bf16]

--bf16 adds the fused model in bf16 (BN parameters fp32; the input cast to bf16 inside the timed call)
against the same fp32 peers.
"""
import argparse
import copy
import io
import statistics
import time
import warnings

import torch

import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixerPaper

MODELS = {"256/8": (256, 8, 9, 2, "gelu", 32, 64), "768/32": (768, 32, 7, 7, "relu", 224, 2)}


def onnx_bytes(model, x):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17)
    return f.getvalue()


def peers(model, x, threads, use_compile):
    """name -> callable(x) or the reason it is skipped."""
    out = {"eager NCHW": lambda: model(x)}
    xcl = x.contiguous(memory_format=torch.channels_last)
    mcl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out["eager channels_last"] = lambda: mcl(xcl)
    if use_compile:
        import torch._inductor.config as ic
        ic.freezing = True
        try:
            cm = torch.compile(model)
            with torch.no_grad():
                cm(x)
            out["torch.compile (freezing)"] = lambda: cm(x)
        except Exception as e:  # noqa: BLE001
            out["torch.compile (freezing)"] = f"failed: {type(e).__name__}: {e}"[:120]
        finally:
            ic.freezing = False
    else:
        out["torch.compile (freezing)"] = "skipped (--no-compile)"
    blob = None
    try:
        import onnxruntime as ort
        blob = onnx_bytes(model, x)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        name, xn = sess.get_inputs()[0].name, x.numpy()
        out[f"ONNX Runtime {ort.__version__}"] = lambda: sess.run(None, {name: xn})
    except ImportError:
        out["ONNX Runtime"] = "skipped (onnxruntime not installed)"
    try:
        import openvino as ov
        blob = blob or onnx_bytes(model, x)
        core = ov.Core()
        cm_ov = core.compile_model(core.read_model(blob, b""), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        xn = x.numpy()
        out[f"OpenVINO {ov.__version__.split('-')[0]}"] = lambda: cm_ov(xn)
    except ImportError:
        out["OpenVINO"] = "skipped (openvino not installed)"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="256/8,768/32")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also the fused model in bf16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for key in a.models.split(","):
        dim, depth, k, p, act, img, b = MODELS[key]
        torch.manual_seed(0)
        paper = ConvMixerPaper(dim, depth, kernel_size=k, patch_size=p, n_classes=10, act=act).eval()
        x = torch.randn(b, 3, img, img)
        fused = ck.convert(paper, backend="cpu")
        with torch.no_grad():
            ref = paper(x)
            runs = peers(paper, x, a.threads, not a.no_compile)
            runs["fused (convmixer_kernels)"] = lambda: fused(x)
            err = (fused(x) - ref).abs().max().item()
            if a.bf16:
                fused_bf16 = copy.deepcopy(fused).to(torch.bfloat16)
                for m in fused_bf16.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.float()
                runs["fused (convmixer_kernels) bf16"] = lambda: fused_bf16(x.bfloat16())
                err_bf16 = (fused_bf16(x.bfloat16()).float() - ref).abs().max().item()
            calls = {n: f for n, f in runs.items() if callable(f)}
            for f in calls.values():
                f()  # warm-up
            times = {n: [] for n in calls}
            for r in range(a.reps):
                for n, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    times[n].append((time.perf_counter() - t0) * 1e3)
                print(f"[{key}] rep {r + 1}/{a.reps}", flush=True)
        med = {n: statistics.median(v) for n, v in times.items()}
        best_peer = min(v for n, v in med.items() if not n.startswith("fused"))
        print(f"\nConvMixer-{key} k{k} p{p} {act}, batch {b}, {img} px, eval fp32, NCHW input, {a.threads} threads "
              f"(fused max |logit - eager| = {err:.1e}" + (f", bf16 {err_bf16:.1e}, |logit| <= "
                                                            f"{ref.abs().max().item():.1e})" if a.bf16 else ")"))
        print(f"| runtime | ms | img/s | best peer / this |\n| --- | ---: | ---: | ---: |")
        for n, f in runs.items():
            if n in med:
                print(f"| {n} | {med[n]:.1f} | {b / med[n] * 1e3:.1f} | {best_peer / med[n]:.2f}x |")
            else:
                print(f"| {n} | {f} | | |")


if __name__ == "__main__":
    main()
