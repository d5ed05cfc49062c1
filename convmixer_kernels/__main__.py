"""python -m convmixer_kernels {bench,verify,inspect,info}"""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv else "help"
    if cmd == "bench":
        from .benchmark import main as bench_main
        verify = "--no-verify" not in argv and "--dry-run" not in argv  # a dry run checks code paths only
        rc = bench_main([a for a in argv if a != "--no-verify"])
        if not verify:
            return rc
        from .verify import main as verify_main
        # The product backends of the device; `verify` alone also covers the CUDA emulator.
        return rc or verify_main(["--no-emulator"])
    if cmd == "verify":
        from .verify import main as verify_main
        return verify_main(argv)
    if cmd == "inspect":
        from .static_report import main as inspect_main
        return inspect_main(argv)
    if cmd == "info":
        from .verify import info
        info()
        return 0
    print("usage: python -m convmixer_kernels {bench,verify,inspect,info} [options]\n"
          "  bench   block and model benchmarks (then the numerics check of the device's backends)\n"
          "  verify  numerics report of every op/backend/dtype/layout against the float64 reference\n"
          "  inspect static report of the GPU kernels from their compiled code (registers, spills, SASS mix)\n"
          "  info    versions, device and backends", file=sys.stderr)
    return 0 if cmd in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
