"""Test-side wrapper of convmixer_kernels.numerics: the same harness, asserting every check."""
from convmixer_kernels.numerics import ATOL, Check, compare_block, make_block_params, max_err, rule  # noqa: F401


def check_rule(name, fused, same, ref64, dtype):
    c = rule(name, fused, same, ref64, dtype)
    assert c.ok, str(c)


def run_block(kind, x, p, training, act, **kw):
    failures = [str(c) for c in compare_block(kind, x, p, training, act, **kw) if not c.ok]
    assert not failures, "\n".join(failures)
