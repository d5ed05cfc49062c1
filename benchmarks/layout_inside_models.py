"""Eval time of converted paper ConvMixers fed NCHW images (the default everywhere), 2 threads, one process,
interleaved: eager PyTorch, the fused model keeping NCHW (convert(cpu_channels_last=False)), and the fused
model running channels_last inside (the default). python benchmarks/layout_inside_models.py"""
import time, torch, statistics
import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixerPaper
torch.set_num_threads(2)
torch.manual_seed(0)
for name, (dim, depth, k, p, act, img, b) in {"256/8": (256, 8, 9, 2, "gelu", 32, 64),
                                              "768/32": (768, 32, 7, 7, "relu", 224, 2)}.items():
    paper = ConvMixerPaper(dim, depth, kernel_size=k, patch_size=p, n_classes=10, act=act).eval()
    on = ck.convert(paper, backend="cpu")
    off = ck.convert(paper, backend="cpu", cpu_channels_last=False)
    x = torch.randn(b, 3, img, img)
    times = {"eager NCHW": [], "fused, NCHW kept": [], "fused, channels_last inside": []}
    with torch.no_grad():
        for m in (paper, on, off):
            m(x)
        for _ in range(5):
            for label, m in (("eager NCHW", paper), ("fused, NCHW kept", off), ("fused, channels_last inside", on)):
                t0 = time.perf_counter(); m(x); times[label].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["eager NCHW"])
    for label, v in times.items():
        print(f"ConvMixer-{name} b{b} {img}px eval, NCHW input: {label:30s} {statistics.median(v):8.1f} ms  "
              f"{base / statistics.median(v):.2f}x eager NCHW", flush=True)
