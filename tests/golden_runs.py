"""Golden runs: short trainings of the registry models with every kind of method, fingerprinted, so that a change
to the masking core can be checked to train exactly as before (committed benchmark results stay valid).

    python tests/golden_runs.py --write     # record the fingerprints of the code as it is now

The runs use the 12×12 synthetic data (fast, no files), on which every registry model but the VGG (four 2×2
pools) runs; the VGG's layers are plain convs + BatchNorm, covered by the ResNets' runs.
A fingerprint holds, per run, the SHA-256 of every tensor of the final model (weights and masks) and of the
metrics file, plus numbers that survive another CPU (per-layer mask counts, losses, accuracy). Bit-identity is
only defined on the machine that wrote the file (another CPU may sum in another order): test_golden_runs.py
compares hashes there and the portable numbers, within a tolerance, everywhere else.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from regrow import checkpoint  # noqa: E402
from regrow.artifacts import METRICS, MODEL  # noqa: E402
from regrow.env import cpu_name  # noqa: E402
from regrow.methods.channel import CHANNEL_PAPER_CYCLE  # noqa: E402
from regrow.methods.iee import PAPER_CYCLE  # noqa: E402
from regrow.training import TrainConfig, build_trainer  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "runs.json"
IEE_SHORT = {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2}
# The IEE runs were recorded at the paper's cycle (Θ_K frozen while Θ_P explores, α = 0.3) when never-active units
# kept their initial values by default; pinned, so the fingerprints stay those of the same training (zeros have their
# own run, resnet8-iee-zero, and regrow's defaults theirs, resnet8-iee-defaults).
IEE_PAPER = {**IEE_SHORT, **PAPER_CYCLE}
# IEE for channels likewise: recorded at the paper's channel cycle (remembered values, Θ_K frozen), then its defaults
IEE_CHANNEL_PAPER = {**IEE_SHORT, **CHANNEL_PAPER_CYCLE}
IEE_INIT = {**IEE_PAPER, "never_active": "init"}
RUNS: dict[str, dict] = {
    "resnet8-dense": dict(model="resnet8", method="dense"),
    "resnet8-static": dict(model="resnet8", method="static"),
    "resnet8-gmp": dict(model="resnet8", method="gmp", method_options={"interval": 2}),
    "resnet8-set": dict(model="resnet8", method="set", method_options={"interval": 2}),
    "resnet8-rigl": dict(model="resnet8", method="rigl", method_options={"interval": 2}),
    "resnet8-iee": dict(model="resnet8", method="iee", method_options=IEE_INIT),
    "resnet8-iee-zero": dict(model="resnet8", method="iee", method_options={**IEE_PAPER, "never_active": "zero"}),
    "resnet8-iee-defaults": dict(model="resnet8", method="iee", method_options=IEE_SHORT),
    "resnet8-rigl-2:4": dict(model="resnet8", method="rigl", sparsity=0.5, structure="2:4",
                             method_options={"interval": 2}),
    "resnet8-halp": dict(model="resnet8", method="halp", structure="channel", cost="macs", latency_target=0.6,
                         method_options={"prune_every": 2, "prune_steps": 3}),
    "resnet8-iee-channel": dict(model="resnet8", method="iee", structure="channel", cost="macs", latency_target=0.6,
                                method_options=IEE_CHANNEL_PAPER),
    "resnet8-iee-channel-defaults": dict(model="resnet8", method="iee", structure="channel", cost="macs",
                                         latency_target=0.6, method_options=IEE_SHORT),
    # three cycles of H = J = Q = 1 in the 9 steps before t_end: the default first cut, ramped over all three
    "resnet8-iee-channel-ramp": dict(model="resnet8", method="iee", structure="channel", cost="macs",
                                     latency_target=0.6, method_options=dict.fromkeys(IEE_SHORT, 1)),
    "mlp-rigl": dict(model="mlp", method="rigl", method_options={"interval": 2}),
    "mlp-iee": dict(model="mlp", method="iee", method_options=IEE_INIT),
    "mlp-set": dict(model="mlp", method="set", method_options={"interval": 2}),
    "mobilenetv2-rigl": dict(model="mobilenetv2", method="rigl", method_options={"interval": 2}),
    "resnet20-iee": dict(model="resnet20", method="iee", method_options=IEE_INIT),
}


# Post-training runs: each starts from the dense teacher of the named golden training run.
PTS_QUICK = {"epochs": 2, "batch_size": 16, "population": 4, "generations": 2, "parents": 2, "children": 2,
             "mutants": 1}
PTS_RUNS: dict[str, dict] = {
    "resnet8-pts-magnitude": dict(teacher="resnet8-dense", method="magnitude", sparsity=0.7),
    "resnet8-pts-pot": dict(teacher="resnet8-dense", method="pot", sparsity=0.7),
    "resnet8-pts-wanda": dict(teacher="resnet8-dense", method="wanda", sparsity=0.7),
    "resnet8-pts-unipts": dict(teacher="resnet8-dense", method="unipts", sparsity=0.7, options=PTS_QUICK),
    "resnet8-pts-unipts-2:4": dict(teacher="resnet8-dense", method="unipts", sparsity=None, structure="2:4",
                                   options=PTS_QUICK),
    "mlp-pts-wanda": dict(teacher="mlp-dense", method="wanda", sparsity=0.8),
}
RUNS["mlp-dense"] = dict(model="mlp", method="dense")


def machine() -> str:
    return f"{cpu_name()}|{platform.machine()}|torch={torch.__version__}"


def config(name: str) -> TrainConfig:
    base = dict(dataset="synthetic", synthetic_size=64, sparsity=0.8, distribution="erk", epochs=3, max_steps=12,
                batch_size=16, log_every=1, progress=False, seed=0, device="cpu", channels_last=False)
    return TrainConfig(**{**base, **RUNS[name]})


def fingerprint(name: str) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(config(name), out)
        summary = trainer.run()
        state = trainer.model.state_dict()
        metrics = (Path(out) / METRICS).read_text()
    tensors = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}
    return {
        "tensors": tensors,
        "metrics": hashlib.sha256(metrics.encode()).hexdigest(),
        "mask_counts": {k: int(v.sum()) for k, v in state.items() if k.endswith("_mask")},
        "losses": [record["loss"] if record["loss"] is not None else record["explore_loss"]
                   for record in map(json.loads, metrics.splitlines()) if "lr" in record],
        "test_accuracy": summary["test_accuracy"],
        "sparsity_masked": summary["sparsity_masked"],
        "mask_updates": summary["mask_updates"],
    }


def fingerprint_pts(name: str) -> dict:
    from regrow.posttraining import PTSConfig, run_pts

    torch.set_num_threads(1)
    spec = dict(PTS_RUNS[name])
    teacher = spec.pop("teacher")
    with tempfile.TemporaryDirectory() as out:
        build_trainer(config(teacher), Path(out) / "teacher").run()
        pts_config = PTSConfig(dataset="synthetic", synthetic_size=64, calibration_size=32, progress=False, **spec)
        summary = run_pts(pts_config, Path(out) / "teacher", Path(out) / "pts")
        sections, _ = checkpoint.load(Path(out) / "pts" / MODEL)
    state = sections["model"]
    return {
        "tensors": {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()},
        "mask_counts": {k: int(v.sum()) for k, v in state.items() if k.endswith("_mask")},
        "test_accuracy": summary["test_accuracy"],
        "test_loss": summary["test_loss"],
        "sparsity_masked": summary["sparsity_masked"],
        "train_flops": summary["train_flops"],
    }


def main() -> int:
    if sys.argv[1:] != ["--write"]:
        print(__doc__)
        return 2
    GOLDEN.parent.mkdir(exist_ok=True)
    data = {"machine": machine(), "runs": {name: fingerprint(name) for name in RUNS},
            "pts_runs": {name: fingerprint_pts(name) for name in PTS_RUNS}}
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(RUNS)} training and {len(PTS_RUNS)} post-training golden runs -> {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
