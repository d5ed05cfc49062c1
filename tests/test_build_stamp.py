"""A compiled extension that does not match csrc/ must fail at import with how to rebuild (issue 11, item 5)."""
import os
import subprocess
import sys

import pytest

from convmixer_kernels import _build_stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built_extension():
    try:
        from convmixer_kernels import _C
    except ImportError as e:
        pytest.skip(f"the extension is not built ({e})")
    return _C


def test_extension_carries_this_checkouts_digest():
    ext = _built_extension()
    assert ext.source_digest == _build_stamp.source_digest()


def test_digest_follows_the_sources(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "a.cpp").write_text("int f();\n")
    before = _build_stamp.source_digest(str(src))
    (src / "a.cpp").write_text("int f(int);\n")
    assert _build_stamp.source_digest(str(src)) != before
    assert _build_stamp.source_digest(str(tmp_path / "missing")) is None


def test_stale_extension_fails_import_with_rebuild_hint(tmp_path):
    """A copy of the package next to a csrc/ that differs by one byte: importing it must raise."""
    ext = _built_extension()
    pkg = tmp_path / "convmixer_kernels"
    pkg.mkdir()
    src_pkg = os.path.join(ROOT, "convmixer_kernels")
    for name in os.listdir(src_pkg):
        if name != "__pycache__":
            os.symlink(os.path.join(src_pkg, name), pkg / name)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "changed.cpp").write_text("// edited after the build\n")
    assert os.path.basename(ext.__file__) in os.listdir(pkg)
    # _build_stamp resolves csrc/ from its own path; a symlinked copy would point back at the checkout.
    os.unlink(pkg / "_build_stamp.py")
    with open(os.path.join(src_pkg, "_build_stamp.py")) as f:
        (pkg / "_build_stamp.py").write_text(f.read())
    code = "import convmixer_kernels"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "does not match" in r.stderr and "build_ext --inplace" in r.stderr, r.stderr


def test_check_extension_rejects_unstamped_build():
    class Unstamped:
        __file__ = "_C.so"
    with pytest.raises(ImportError, match="no source stamp"):
        _build_stamp.check_extension(Unstamped())


def test_cpu_vectors_match_the_build_machine():
    """A build for this machine (the default -march=native) uses vectors as wide as its registers: 64 bytes with
    AVX-512, 32 without. 64-byte vectors on an AVX2 target compiled to code ~10x under the FMA peak."""
    ext = _built_extension()
    if os.environ.get("CONVMIXER_CPU_ARCH", "native") != "native":
        pytest.skip("built for CONVMIXER_CPU_ARCH, not for this machine")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no x86 /proc/cpuinfo flags on this system")
    assert ext.cpu_vector_bytes() == (64 if "avx512f" in flags else 32)
