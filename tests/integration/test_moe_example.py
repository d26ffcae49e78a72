"""examples/moe_example.py runs as a user would run it: all four MoE kinds, then Flex-MoE's
per-combination accuracy and Time-MoE's forecast on their real data sets."""

import re
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.slow


def test_moe_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "moe_example.py")], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for kind in ("base", "flex", "time", "pikv"):
        assert re.search(rf"^{kind} +\(2, 16, 512\) -> \(2, 16, 512\)", out, re.M), kind
    accs = [float(a) for a in re.findall(r"^flex  held-out accuracy with .* (\d\.\d+)$", out, re.M)]
    assert len(accs) == 7 and all(0.0 <= a <= 1.0 for a in accs)
    assert re.search(r"^time  held-out series, horizon 24: MSE \d+\.\d+ \(seasonal naive \d+\.\d+\)", out, re.M)
