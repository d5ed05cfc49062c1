"""Block and model benchmarks (see convmixer_kernels/benchmark.py); same as `python -m convmixer_kernels bench`."""
import sys

from convmixer_kernels.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
