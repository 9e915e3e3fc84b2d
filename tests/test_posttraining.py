"""The post-training pipeline end to end (``regrow pts`` / :func:`regrow.posttraining.run_pts`) on tiny models."""

import json

import pytest
import torch

from regrow import masking
from regrow import posttraining as pts
from regrow.cli import main
from regrow.errors import CheckpointError, ConfigError, DataError
from regrow.posttraining import PTSConfig, run_pts
from regrow.structures import NM
from regrow.training import MODEL, SUMMARY, TrainConfig, build_trainer, load_model

# A search and a sparse training that take a second or two: the recipe's shape, not its length.
QUICK = {"epochs": 6, "batch_size": 32, "population": 6, "generations": 3, "parents": 3, "children": 3,
         "mutants": 2}
TRAIN_FIELDS = {"method", "model", "dataset", "sparsity_target", "sparsity_actual", "distribution", "structure",
                "test_accuracy", "test_loss", "test_accuracy_per_epoch", "train_flops", "dense_train_flops",
                "train_flops_ratio", "wall_seconds", "steps", "epochs", "seed", "params_total", "params_nonzero",
                "macs_dense", "macs_sparse", "layers", "skipped_layers", "mask_updates", "mask_metrics", "config",
                "environment"}


def _teacher(root, model):
    out = root / f"dense-{model}"
    build_trainer(TrainConfig(model=model, dataset="synthetic", method="dense", epochs=2, batch_size=32, seed=0,
                        progress=False), out).run()
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {m: _teacher(root, m) for m in ("resnet8", "mlp")}


def _run(teacher, out, **kw):
    options = {**QUICK, **kw.pop("options", {})} if kw.get("method", "unipts") == "unipts" else kw.pop("options", {})
    config = PTSConfig(dataset="synthetic", calibration_size=kw.pop("calibration_size", 64), options=options,
                       progress=False, **kw)
    return run_pts(config, teacher, out)


def _masks(out):
    model, _ = load_model(out / MODEL)
    return {n: m.weight_mask.bool() for n, m in masking.masked_layers(model).items()}


@pytest.mark.parametrize("method", ["magnitude", "pot", "wanda", "unipts"])
@pytest.mark.parametrize("arch", ["resnet8", "mlp"])
def test_every_method_writes_the_train_summary_and_a_model_at_the_exact_sparsity(teachers, tmp_path, method, arch):
    s = _run(teachers[arch], tmp_path / "out", method=method, sparsity=0.8)
    assert TRAIN_FIELDS <= set(s) and s["method"] == method and s["model"] == arch
    masks = _masks(tmp_path / "out")
    layers = masking.prunable_layers(load_model(teachers[arch] / MODEL)[0])
    assert set(masks) == set(layers)  # every conv and Linear layer, first and classifier included
    for name, mask in masks.items():
        expected = 1 - s["layer_sparsities"][name]
        if method == "wanda":  # per output row
            rows = mask.reshape(mask.shape[0], -1)
            assert (rows.sum(1) == max(1, round(0.2 * rows.shape[1]))).all()
        else:
            assert int(mask.sum()) == max(1, round(expected * mask.numel())), name
    if method != "unipts":
        assert all(v == 0.8 for v in s["layer_sparsities"].values())
        assert s["sparsity_actual"] == pytest.approx(0.8, abs=2e-3)
    else:  # searched: every layer capped at P + 0.05, the global target met (or slightly above, reported)
        assert all(v <= 0.85 + 1e-9 for v in s["layer_sparsities"].values())
        assert s["sparsity_actual"] >= 0.8 - 2e-3
        assert s["search"]["achieved_sparsity"] >= 0.8 - 1e-9
        assert 0 <= s["search"]["heldout_accuracy"] <= 1 and s["steps"] == 6 * 2
    # The saved model reloads and evaluates to the reported accuracy.
    model, meta = load_model(tmp_path / "out" / MODEL)
    from regrow.data import load_dataset
    from regrow.training import evaluate
    assert evaluate(model, load_dataset("synthetic", "test"))[0] == pytest.approx(s["test_accuracy"])
    assert json.loads((tmp_path / "out" / SUMMARY).read_text())["test_accuracy"] == s["test_accuracy"]


def test_unipts_is_seeded_and_its_search_differs_from_equal_shares(teachers, tmp_path):
    a = _run(teachers["resnet8"], tmp_path / "a", method="unipts", sparsity=0.9, seed=3)
    b = _run(teachers["resnet8"], tmp_path / "b", method="unipts", sparsity=0.9, seed=3)
    assert a["layer_sparsities"] == b["layer_sparsities"] and a["test_accuracy"] == b["test_accuracy"]
    assert all(torch.equal(x, _masks(tmp_path / "b")[n]) for n, x in _masks(tmp_path / "a").items())
    assert a["search"]["fitness_evaluations"] <= 6 * 3
    history = [h["best_fitness"] for h in a["search"]["history"]]
    assert history == sorted(history)  # the best so far never gets worse
    # the sparse training ran in the shared trainer, in a folder of the run: one loss line per step, one evaluation
    trained = json.loads((tmp_path / "a" / "sparse-training" / "summary.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "a" / "sparse-training" / "metrics.jsonl").read_text().splitlines()]
    assert trained["steps"] == a["training"]["steps"] == sum("lr" in r for r in lines) == 6 * 2
    assert trained["evaluated_epochs"] == [5] and trained["test_accuracy"] == pytest.approx(a["test_accuracy"])
    assert a["training"]["loss_first"] == lines[0]["loss"] and a["training"]["folder"] == "sparse-training"
    assert not (tmp_path / "a" / "sparse-training" / "recipe.yaml").exists()  # a recipe cannot name the teacher
    assert not any((tmp_path / "a" / "sparse-training" / f).exists() for f in ("checkpoint.safetensors",
                                                                                "model.safetensors"))
    # per sample: the teacher (dense), the student's forward and input gradient (sparse), its weight gradient
    # (dense under the straight-through estimator); FLOPs = 2 × MACs
    per_sample = 2 * (2 * a["macs_dense"] + 2 * a["macs_sparse"])
    assert trained["train_flops"] == pytest.approx(12 * 32 * per_sample, rel=1e-9)


def test_unipts_ablations_change_what_they_name(teachers, tmp_path, monkeypatch):
    taus = []
    real = pts.base_decayed_kl
    monkeypatch.setattr(pts.unipts, "base_decayed_kl", lambda s, t, tau, T: taus.append(tau) or real(s, t, tau, T))
    teacher = teachers["resnet8"]
    default = _run(teacher, tmp_path / "default", method="unipts", sparsity=0.8)
    assert taus == [pytest.approx(8 * 0.99 ** (100 * (step // 2) / 6)) for step in range(12)]  # τ = 8·0.99^e

    taus.clear()
    _run(teacher, tmp_path / "constant", method="unipts", sparsity=0.8, options={"tau": "constant"})
    assert taus == [1.0] * 12

    taus.clear()
    mse = _run(teacher, tmp_path / "mse", method="unipts", sparsity=0.8, options={"loss": "mse"})
    assert taus == [] and mse["training"]["loss_last"] >= 0

    uniform = _run(teacher, tmp_path / "uniform", method="unipts", sparsity=0.8, options={"distribution": "uniform"})
    assert "search" not in uniform and set(uniform["layer_sparsities"].values()) == {0.8}
    assert "search" in default

    free = _run(teacher, tmp_path / "free", method="unipts", sparsity=0.8, options={"distribution": "unconstrained"})
    assert free["search"]["margin"] == pytest.approx(0.2) and default["search"]["margin"] == 0.05

    # A static mask is the magnitude mask of the dense weights at the searched sparsities, kept to the end.
    static = _run(teacher, tmp_path / "static", method="unipts", sparsity=0.8, options={"mask": "static"})
    dense_layers = masking.prunable_layers(load_model(teacher / MODEL)[0])
    expected = pts.magnitude_masks(dense_layers, static["layer_sparsities"])
    assert all(torch.equal(m, expected[n]) for n, m in _masks(tmp_path / "static").items())
    dynamic = _masks(tmp_path / "default")
    initial = pts.magnitude_masks(dense_layers, default["layer_sparsities"])
    assert any(not torch.equal(m, initial[n]) for n, m in dynamic.items())  # dynamic masks moved


@pytest.mark.parametrize("method", ["magnitude", "pot", "wanda", "unipts"])
def test_nm_keeps_n_of_every_m_in_every_layer_it_can_split(teachers, tmp_path, method):
    s = _run(teachers["resnet8"], tmp_path / "nm", method=method, structure="2:4", sparsity=None)
    nm = NM(2, 4)
    checked = 0
    for name, mask in _masks(tmp_path / "nm").items():
        if nm.supports(mask.shape):
            assert (nm._to_groups(mask).sum(1) == 2).all(), name
            checked += 1
        else:  # the 1-channel stem cannot be split along its inputs: dense, and reported
            assert mask.all() and name in s["skipped_layers"]
    assert checked >= 5 and s["structure"] == "2:4" and "search" not in s


def test_dynamic_sparsity_under_nm_is_exact_after_every_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    dst = pts.DynamicSparsity(model, sparsities={"0": 0.5}, structure=NM(2, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        loss = model(torch.randn(16, 8)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dst.step()
        mask = dst.masks()["0"]
        assert (mask.reshape(-1, 4).sum(1) == 2).all()
    raw = masking.raw(model[0]).detach()
    assert torch.equal(dst.masks()["0"], pts.select_mask(raw.abs(), 0.5, NM(2, 4)))


@pytest.mark.parametrize("kw, error, message", [
    ({"calibration_size": 0}, ConfigError, "calibration size"),
    ({"calibration_size": 10_000}, DataError, "larger than the training set"),
    ({"sparsity": 1.3}, ConfigError, "sparsity"),
    ({"sparsity": 0.9, "structure": "2:4"}, ConfigError, "cannot express 0.9"),
    ({"method": "obs"}, ConfigError, "unknown post-training method"),
    ({"options": {"populaton": 3}}, ConfigError, "unknown option"),
    ({"options": {"loss": "l1"}}, ConfigError, "loss must be one of"),
    ({"sparsity": 0.97}, ConfigError, "P \\+ margin"),
    ({"expect_model": "resnet20"}, CheckpointError, "not resnet20"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(teachers, tmp_path, kw, error, message):
    kw = {"method": "unipts", "sparsity": 0.8, **kw}
    expect = kw.pop("expect_model", None)
    with pytest.raises(error, match=message):
        run_pts(PTSConfig(dataset="synthetic", progress=False, expect_model=expect,
                          **{"calibration_size": 64, **kw}), teachers["resnet8"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sparse_checkpoint_and_an_existing_result_are_refused(teachers, tmp_path):
    _run(teachers["mlp"], tmp_path / "first", method="magnitude", sparsity=0.5)
    before = (tmp_path / "first" / SUMMARY).read_bytes()
    with pytest.raises(CheckpointError, match="sparse model"):
        _run(tmp_path / "first", tmp_path / "second", method="magnitude", sparsity=0.5)
    with pytest.raises(CheckpointError, match="already holds a result"):
        _run(teachers["mlp"], tmp_path / "first", method="wanda", sparsity=0.5)
    assert (tmp_path / "first" / SUMMARY).read_bytes() == before
    with pytest.raises(CheckpointError, match="no model"):
        _run(tmp_path / "missing", tmp_path / "third", method="magnitude", sparsity=0.5)


def test_pts_from_the_cli(teachers, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["pts", str(teachers["mlp"]), "--method", "unipts", "--sparsity", "0.7", "--calibration-size", "64",
            "--dataset", "synthetic", "--seed", "1", "--out", str(out), "--no-progress"]
    args += [f"--opt={k}={v}" for k, v in QUICK.items()] + ["--opt", "mask=static"]
    assert main(args) == 0
    s = json.loads((out / SUMMARY).read_text())
    assert s["options"]["mask"] == "static" and s["options"]["generations"] == 3 and s["seed"] == 1
    assert "test accuracy" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "64 calibration samples" in report and "held-out" in report and "unipts on mlp" in report
    assert main(["pts", str(teachers["mlp"]), "--sparsity", "1.3", "--dataset", "synthetic",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsity" in err[0] and not (tmp_path / "bad").exists()


def test_a_search_is_reused_by_a_later_run_and_checked(teachers, tmp_path):
    first = _run(teachers["resnet8"], tmp_path / "first", method="unipts", sparsity=0.8)
    again = _run(teachers["resnet8"], tmp_path / "again", method="unipts", sparsity=0.8,
                 options={"search_from": str(tmp_path / "first"), "mask": "static"})
    assert again["layer_sparsities"] == first["layer_sparsities"]
    assert again["search"]["reused_from"].endswith(SUMMARY) and "search" not in again["stage_seconds"]
    with pytest.raises(CheckpointError, match="at sparsity 0.8"):
        _run(teachers["resnet8"], tmp_path / "other", method="unipts", sparsity=0.7,
             options={"search_from": str(tmp_path / "first")})
    _run(teachers["resnet8"], tmp_path / "magnitude", method="magnitude", sparsity=0.8)
    with pytest.raises(CheckpointError, match="not the summary of a UniPTS run"):
        _run(teachers["resnet8"], tmp_path / "other", method="unipts", sparsity=0.8,
             options={"search_from": str(tmp_path / "magnitude")})
    with pytest.raises(CheckpointError, match="cannot read a run summary"):
        _run(teachers["resnet8"], tmp_path / "other", method="unipts", sparsity=0.8,
             options={"search_from": str(tmp_path / "magnitude" / MODEL)})
    assert not (tmp_path / "other").exists()
