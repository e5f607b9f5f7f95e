"""The C++ examples build against the plain headers and kernels alone (no
torch) and print what the torch reference computes."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf_engine.ops import gae

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++")


def build_and_run(tmp_path, example, sources):
    """Compile examples/<example> with the given csrc/cpu sources; its stdout."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    exe = tmp_path / Path(example).stem
    cmd = [CXX, "-O2", "-std=c++17", "-pthread", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cpu'}",
           str(ROOT / "examples" / example), *(str(ROOT / "csrc/cpu" / s) for s in sources), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_gae_example_matches_torch_reference(tmp_path):
    out = build_and_run(tmp_path, "gae_example.cpp", ["advantages.cpp", "parallel.cpp"])
    printed = torch.tensor([[float(x) for x in line.split()] for line in out.strip().splitlines()],
                           dtype=torch.float64)
    # The example's batch (examples/gae_example.cpp), as float32 values.
    rewards = torch.tensor([[0.0, 9.0, 9.0, 1.0], [5.0, 0.1, -0.2, 1.5]]).double()
    values = torch.tensor([[0.5, 7.0, 7.0, 0.25], [3.0, 0.4, 0.3, 0.6]]).double()
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    gamma, lam = 0.99, 0.95
    # The C entry point takes float32 gamma and lam.
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    adv, ret = gae(rewards, values, mask, gamma=f32(gamma), lam=f32(lam), backend="torch")
    torch.testing.assert_close(printed, torch.cat([adv, ret]), rtol=1e-6, atol=1e-7)
