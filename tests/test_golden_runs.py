"""Registry models train, and are sparsified after training, exactly as the recorded golden runs (see
golden_runs.py): bit for bit on the machine that recorded them, the portable numbers (mask counts per layer,
losses, accuracy) everywhere."""

import json

import pytest

from golden_runs import GOLDEN, PTS_RUNS, RUNS, fingerprint, fingerprint_pts, machine

RECORDED = json.loads(GOLDEN.read_text())


def test_every_golden_run_is_recorded():
    assert set(RECORDED["runs"]) == set(RUNS) and set(RECORDED["pts_runs"]) == set(PTS_RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run(name):
    expected, got = RECORDED["runs"][name], fingerprint(name)
    assert got["mask_counts"] == expected["mask_counts"]
    assert got["mask_updates"] == expected["mask_updates"]
    assert got["sparsity_masked"] == pytest.approx(expected["sparsity_masked"], abs=1e-12)
    # The first step's loss is the start's; later ones amplify another CPU's rounding through these short,
    # high-learning-rate runs (measured against the Intel recording on an AMD EPYC: up to 2.2 % by step 12,
    # resnet20-iee, with every mask count equal), so they are held to 5 % off the recording machine.
    tolerance = 1e-3 if machine() == RECORDED["machine"] else 5e-2
    assert got["losses"][0] == pytest.approx(expected["losses"][0], rel=1e-3, abs=1e-4)
    assert got["losses"] == pytest.approx(expected["losses"], rel=tolerance, abs=1e-4)
    if machine() != RECORDED["machine"]:
        pytest.skip(f"bit-identity is checked on the recording machine ({RECORDED['machine']}); portable numbers "
                    "matched here")
    assert got["tensors"] == expected["tensors"]
    assert got["metrics"] == expected["metrics"]
    assert got["test_accuracy"] == expected["test_accuracy"]


@pytest.mark.parametrize("name", sorted(PTS_RUNS))
def test_golden_post_training_run(name):
    expected, got = RECORDED["pts_runs"][name], fingerprint_pts(name)
    assert got["mask_counts"].keys() == expected["mask_counts"].keys()
    assert got["sparsity_masked"] == pytest.approx(expected["sparsity_masked"], abs=0.02)  # searches may differ
    assert got["train_flops"] == pytest.approx(expected["train_flops"], rel=0.05)
    if machine() != RECORDED["machine"]:
        pytest.skip(f"bit-identity is checked on the recording machine ({RECORDED['machine']}); portable numbers "
                    "matched here")
    assert got == expected
