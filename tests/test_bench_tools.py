"""The benchmark scripts' own machinery: the post-training grid's plan and the worker pool's lifetime."""

import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_pts(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # runner changes into the repository root; the fixture puts the cwd back
    monkeypatch.syspath_prepend(str(BENCH))
    import pts as bench_pts_module
    return bench_pts_module


def grid_args(**overrides):
    args = Namespace(generations=2, population=4, epochs=1, quick=False, name="pts-test", seeds=2,
                     sparsities=[0.5, 0.9], calibration_sizes=[64, 32], unipts_sparsities=[0.5, 0.9], ablations=True)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def methods_at(phase, sparsity):
    return sorted({method for method, s, *_ in phase.values() if s == sparsity})


def test_pts_plan_runs_unipts_only_where_asked_and_ablations_only_when_asked(bench_pts):
    main, ablations, variants, small = bench_pts.plan(grid_args())
    assert methods_at(main, 0.5) == methods_at(main, 0.9) == ["magnitude", "pot", "unipts", "wanda"]
    assert len(ablations) == 2 * len(bench_pts.ABLATIONS)

    main, ablations, variants, small = bench_pts.plan(grid_args(unipts_sparsities=[0.9], ablations=False))
    assert methods_at(main, 0.5) == methods_at(small, 0.5) == ["magnitude", "pot", "wanda"]
    assert methods_at(main, 0.9) == ["magnitude", "pot", "unipts", "wanda"]
    assert ablations == {}
    assert len(variants) == 2 * 2 * len(bench_pts.BN_VARIANTS)  # the baselines' BN variants still run

    _, ablations, _, _ = bench_pts.plan(grid_args(unipts_sparsities=[0.5]))
    assert ablations == {}  # the ablations reuse the 90 % UniPTS runs, which this grid does not make


def test_pts_rejects_unipts_sparsities_outside_the_grid_before_doing_anything(bench_pts, capsys):
    with pytest.raises(SystemExit):
        bench_pts.main(["--sparsities", "0.5", "0.9", "--unipts-sparsities", "0.8"])
    assert "--unipts-sparsities [0.8] must be among --sparsities [0.5, 0.9]" in capsys.readouterr().err


WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {bench!r})
import runner

def wait(pid_file, threads):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
    return {{}}

if __name__ == "__main__":
    runner.run_in_pool({{"a": (wait, ({pid_file!r},))}}, 2, lambda k, s: None)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_pool_workers_stop_when_the_grid_process_is_killed(tmp_path):
    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "grid.py"
    script.write_text(WORKER_SCRIPT.format(bench=str(BENCH), pid_file=str(pid_file)))
    grid = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(grid.pid, signal.SIGKILL)
        grid.wait()
        deadline = time.monotonic() + 20
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the grid's process"
            time.sleep(0.1)
    finally:
        grid.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"  # a zombie has stopped; only its parent's wait is missing
