"""`python -m convmixer_kernels verify`, the numerics report users run on their machine (README "Numerics"):
it passes on the CPU backend in every dtype it reports, fp64 included, and a kernel whose output is off makes
its lines FAIL and the exit status 1."""
import dataclasses

import pytest

from convmixer_kernels import backends
from convmixer_kernels.verify import main as verify_main

pytestmark = pytest.mark.skipif(not backends.available_backends()["cpu"][0], reason="CPU backend not built")


def test_verify_cpu_passes(capsys):
    assert verify_main(["--device", "cpu", "--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    for dtype in ("float32", "bfloat16", "float64"):
        assert f"PASS cpu      dw    k=9 {dtype}" in out, out
    assert "FAIL" not in out and "all checks passed" in out


def test_verify_reports_a_wrong_kernel(monkeypatch, capsys):
    """The CPU backend with its depthwise forward output shifted by 0.1, past every dtype's bound (bf16's atol
    is 1e-2): every dw line fails, the pointwise lines still pass, and the exit status is 1."""
    cpu = backends.get_backend("cpu")
    real = cpu.dw_block_forward

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        y = out[0] if isinstance(out, (tuple, list)) else out
        y.add_(0.1)
        return out

    monkeypatch.setitem(backends._LOADED, "cpu", dataclasses.replace(cpu, dw_block_forward=off_by_a_little))
    assert verify_main(["--device", "cpu", "--backends", "cpu"]) == 1
    lines = capsys.readouterr().out.splitlines()
    dw = [ln for ln in lines if ln.strip().startswith(("PASS", "FAIL")) and " dw " in ln]
    pw = [ln for ln in lines if ln.strip().startswith(("PASS", "FAIL")) and " pw " in ln]
    assert dw and all(ln.strip().startswith("FAIL") for ln in dw), dw
    assert pw and all(ln.strip().startswith("PASS") for ln in pw), pw
    assert any("check(s) FAILED" in ln for ln in lines)


def test_verify_unknown_dtype_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        verify_main(["--device", "cpu", "--backends", "cpu", "--dtypes", "fp32,int8"])
    assert e.value.code == 2 and "--dtypes: unknown 'int8'" in capsys.readouterr().err
