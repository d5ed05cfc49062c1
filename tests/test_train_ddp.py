"""examples/train_ddp.py, shortened, as its README command runs it: torchrun with 2 ranks on this machine
(gloo, 127.0.0.1, a bounded timeout; the whole process group is killed if it hangs)."""
import os
import re
import signal
import subprocess
import sys

import pytest

from dist_workers import free_port

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (requirements.txt)")
pytest.importorskip("matplotlib", reason="the digits example needs matplotlib (requirements.txt)")

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("flags", ([], ["--amp", "--sync-bn"]), ids=("fp32", "amp-syncbn"))
def test_train_ddp_two_ranks(tmp_path, flags):
    out = tmp_path / "ddp.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "examples/train_ddp.py",
           "--epochs", "4", "--max-steps-per-epoch", "12", "--dim", "16", "--depth", "2", "--lr", "0.2",
           "--min-acc", "30", "--out", str(out)] + flags
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("train_ddp.py did not finish in 300 s:\n" + log[-3000:])
    assert proc.returncode == 0, log[-3000:]
    # per-rank progress from both ranks, every epoch
    for r in (0, 1):
        assert len(re.findall(rf"\[rank {r}\] epoch \d/4: mean loss", log)) == 4, log[-3000:]
    losses = [float(v) for v in re.findall(r"\[rank 0\] epoch \d/4: mean loss ([0-9.]+)", log)]
    assert losses[-1] < 0.7 * losses[0], losses
    acc = float(re.search(r"final test accuracy ([0-9.]+)%", log).group(1))
    assert acc >= 30, acc  # chance is 10%; eval-mode BN statistics lag the first epochs (train_digits.py)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
