"""Users' own code through the front door: a model and a dataset given as ``module:factory``, and methods written
outside regrow found by ``regrow.register``, by an entry point of an installed package, or as ``module:Class``."""

import json
import sys
import textwrap

import pytest
import torch

import regrow
from regrow import artifacts, checkpoint, export
from regrow.cli import main
from regrow.methods import registry
from regrow.posttraining import methods as pts_methods

USER_CODE = '''
import torch
from torch import nn

import regrow
from regrow import masking
from regrow.methods import DynamicSparsifier
from regrow.posttraining import MaskingMethod, select_mask


def build(in_channels, num_classes, input_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, 32), nn.ReLU(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, num_classes))


def not_a_model():
    return 3


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(160) % 3
    x = torch.randn(160, 1, 10, 10, generator=g) + y.view(-1, 1, 1, 1).float()
    return (x[:128], y[:128]), torch.utils.data.TensorDataset(x[128:], y[128:])


class FirstInactive(DynamicSparsifier):
    """A toy out-of-tree method: grow the inactive units with the lowest flat index (plus an offset)."""

    name = "first-inactive"

    def __init__(self, model, optimizer=None, *, offset: int = 0, **base):
        self.offset = offset
        super().__init__(model, optimizer, **base)

    def grow_scores(self, name, module):
        w = masking.raw(module)
        return -((torch.arange(w.numel()) + self.offset) % w.numel()).float().reshape(w.shape)


def tokens():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = torch.randint(0, 50, (240, 12), generator=g, dtype=torch.int32)
    x[:, 0] = 50 + y.int()  # a class token among eleven random ones
    return (x[:192], y[:192]), (x[192:], y[192:])


class Bag(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.embedding = nn.Embedding(53, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, num_classes)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embedding(ids).mean(1))))


def bag(num_classes):
    return Bag(num_classes)


class Encoder(nn.Module):
    """Image rows as tokens through one nn.TransformerEncoderLayer (its attention never calls its projections)."""

    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        self.embed = nn.Linear(in_channels * input_size, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        b, c, h, w = x.shape
        return self.head(self.encoder(self.embed(x.permute(0, 2, 1, 3).reshape(b, h, c * w))).mean(1))


def encoder(in_channels, num_classes, input_size):
    return Encoder(in_channels, num_classes, input_size)


class WithFeatures(nn.Module):
    """Returns (logits, features), as many models of users' own do."""

    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        self.body = nn.Linear(in_channels * input_size * input_size, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        features = torch.relu(self.body(x.flatten(1)))
        return self.head(features), features


def with_features(in_channels, num_classes, input_size):
    return WithFeatures(in_channels, num_classes, input_size)


def too_wide(in_channels, num_classes, input_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes + 1))


class KeepSmallest(MaskingMethod):
    """A toy out-of-tree post-training method: keep the smallest |w| (or, with flip=false, the largest)."""

    name = "keep-smallest"
    defaults = {"recalibrate_bn": False, "flip": True}

    def select(self, run, model, layers, sparsities):
        sign = -1 if self.options["flip"] else 1
        return {n: select_mask(sign * masking.raw(m).detach().abs(), sparsities[n], run.structure)
                for n, m in layers.items()}
'''

SMALL = ["--epochs", "2", "--batch-size", "32", "--no-progress", "--device", "cpu", "--no-augment"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, importable by name (a fresh name per test: no cached import leaks between tests)."""
    name = f"usercode_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    for family in [*registry.REGISTRY.values(), pts_methods.REGISTRY]:
        for key in [k for k, cls in family.items() if cls.__module__ == name]:
            del family[key]


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


def test_a_users_model_and_dataset_train_export_and_evaluate(user_module, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", f"{user_module}:build", "--dataset", f"{user_module}:data", "--method", "rigl",
                 "--sparsity", "0.8", "--opt", "interval=2", *SMALL, "--epochs", "6", "--out", str(out)]) == 0
    summary = summary_of(out)
    assert summary["model"] == f"{user_module}:build" and summary["steps"] == 24
    assert abs(summary["sparsity_masked"] - 0.8) < 0.01 and summary["test_accuracy"] > 0.5  # classes 0, 1, 2
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main(["export", str(out), "--out", str(tmp_path / "exported.safetensors")]) == 0
    model, meta = export.load_exported(tmp_path / "exported.safetensors")
    assert meta["model"] == f"{user_module}:build" and meta["input_shape"] == [1, 10, 10]
    masked, _ = artifacts.load_model(out / "model.safetensors")
    x = torch.randn(4, 1, 10, 10)
    assert torch.equal(model.eval()(x), masked.eval()(x))


@pytest.mark.parametrize("factory, said", [("with_features", "returns a tuple"),
                                            ("too_wide", "shape (2, 4) for a batch of 2")])
def test_a_model_that_does_not_return_class_logits_is_one_line_before_anything_is_written(
        user_module, tmp_path, capsys, factory, said):
    out = tmp_path / "run"
    assert main(["train", "--model", f"{user_module}:{factory}", "--dataset", f"{user_module}:data", *SMALL,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert said in err and "class logits" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("method", ["rigl", "iee"])
def test_a_users_transformer_trains_with_its_attention_projections_in_the_flops(user_module, tmp_path, method):
    # RigL's dense-gradient FLOPs used to look up the attention's out_proj, which never runs as a module: KeyError
    out = tmp_path / method
    options = ["--opt", "interval=2"] if method == "rigl" else ["--opt", "estimate_steps=2", "--opt",
                                                                 "improve_steps=1", "--opt", "explore_steps=2"]
    assert main(["train", "--model", f"{user_module}:encoder", "--dataset", f"{user_module}:data", "--method",
                 method, "--sparsity", "0.8", *options, *SMALL, "--out", str(out)]) == 0
    summary = summary_of(out)
    # per sample, 10 row tokens: embed 10x16 per token, attention q/k/v and out 16x16 each, feed-forward 16x32
    # and 32x16, head 16x3 once
    hand = 10 * (10 * 16 + 4 * 16 * 16 + 2 * 16 * 32) + 16 * 3
    assert summary["macs_dense"] == hand
    assert summary["dense_train_flops"] == 3 * 2 * hand * 32 * summary["steps"]
    out_proj = next(r for r in summary["layers"] if r["name"] == "encoder.self_attn.out_proj")
    assert out_proj["macs"] == 10 * 16 * 16 and out_proj["density"] < 1
    # the sparse network's MACs: every layer at its density, and the packed q/k/v projection, not masked, dense
    in_proj = 10 * 3 * 16 * 16
    assert summary["macs_sparse"] == pytest.approx(in_proj + sum(r["macs"] * r["density"] for r in summary["layers"]))
    assert summary["train_flops"] > 0
    if method == "rigl":
        assert summary["train_flops"] < summary["dense_train_flops"]


def test_post_training_sparsity_on_a_users_model(user_module, tmp_path):
    dense = tmp_path / "dense"
    assert main(["train", "--model", f"{user_module}:build", "--dataset", f"{user_module}:data", "--method",
                 "dense", *SMALL, "--out", str(dense)]) == 0
    assert main(["pts", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--calibration-size", "32",
                 "--out", str(tmp_path / "pts"), "--no-progress"]) == 0
    summary = summary_of(tmp_path / "pts")
    assert summary["model"] == f"{user_module}:build" and abs(summary["sparsity_masked"] - 0.5) < 0.01


def test_wanda_on_a_users_transformer_leaves_out_the_attention_output_projection_when_told(user_module, tmp_path,
                                                                                            capsys):
    dense = tmp_path / "dense"
    assert main(["train", "--model", f"{user_module}:encoder", "--dataset", f"{user_module}:data", "--method",
                 "dense", *SMALL, "--out", str(dense)]) == 0
    pts = ["pts", str(dense), "--method", "wanda", "--sparsity", "0.5", "--calibration-size", "32", "--no-progress"]
    capsys.readouterr()
    assert main([*pts, "--out", str(tmp_path / "refused")]) == 2  # its out_proj never runs as a module
    assert "--exclude" in capsys.readouterr().err and not (tmp_path / "refused" / "summary.json").exists()
    assert main([*pts, "--exclude", "encoder.self_attn.out_proj", "--out", str(tmp_path / "pts")]) == 0
    summary = summary_of(tmp_path / "pts")
    assert summary["left_dense"]["encoder.self_attn.out_proj.weight"] == "excluded (--exclude)"
    assert summary["config"]["exclude"] == ["encoder.self_attn.out_proj"]
    assert main([*pts, "--exclude", "no.such.layer", "--out", str(tmp_path / "bad")]) == 2
    assert "no prunable Linear/Conv layer named 'no.such.layer'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "{m}:not_a_model", "returned a int, not a torch.nn.Module"),
    ("--model", "{m}:missing", "has no attribute 'missing'"),
    ("--model", "no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
    ("--model", "{m}:", "is not of the form package.module:name"),
    ("--dataset", "{m}:build", "failed when called"),
    ("--method", "{m}:build", "is not a subclass of regrow.BaseSparsifier"),
    ("--method", "first-inactive", "unknown method 'first-inactive'"),
])
def test_bad_user_code_is_one_line(user_module, tmp_path, capsys, flag, value, message):
    args = {"--model": "mlp", "--dataset": "synthetic", "--method": "static"}
    args[flag] = value.format(m=user_module)
    argv = ["train", *[a for kv in args.items() for a in kv], *SMALL, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "summary.json").exists()


def test_an_out_of_tree_method_by_import_path_and_by_register(user_module, tmp_path):
    spec = f"{user_module}:FirstInactive"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", spec, "--sparsity", "0.9",
                 "--opt", "interval=2", "--opt", "offset=3", *SMALL, "--out", str(tmp_path / "a")]) == 0
    summary = summary_of(tmp_path / "a")
    assert summary["method"] == spec and summary["mask_updates"] > 0
    assert abs(summary["sparsity_masked"] - 0.9) < 0.01 and summary["config"]["method_options"]["offset"] == 3
    module = __import__(user_module)
    regrow.register("first-inactive", module.FirstInactive)
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", "first-inactive", "--sparsity",
                 "0.9", "--opt", "interval=2", "--opt", "offset=3", *SMALL, "--out", str(tmp_path / "b")]) == 0
    # the same class under a name: the same training, bit for bit
    (a, _), (b, _) = (checkpoint.load(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert main(["methods"]) == 0
    with pytest.raises(regrow.ConfigError, match="is taken by"):
        regrow.register("rigl", module.FirstInactive)
    with pytest.raises(regrow.ConfigError, match="takes no option 'bogus'"):
        regrow.create("first-inactive", torch.nn.Linear(4, 4), bogus=1)


def test_methods_of_installed_packages_come_through_entry_points(user_module, tmp_path, monkeypatch, capsys):
    dist = tmp_path / "userplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [regrow.methods]
        first-inactive = {user_module}:FirstInactive
        broken-method = {user_module}:does_not_exist
        """))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_entry_point_errors", {})
    with pytest.warns(UserWarning, match="broken-method"):
        assert "first-inactive" in registry.names()
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", "first-inactive", "--sparsity",
                 "0.9", "--opt", "interval=2", *SMALL, "--out", str(tmp_path / "run")]) == 0
    assert summary_of(tmp_path / "run")["mask_updates"] > 0
    capsys.readouterr()
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", "broken-method", *SMALL,
                 "--out", str(tmp_path / "bad")]) == 2
    assert "installed but failed to load" in capsys.readouterr().err


def test_post_training_sparsity_from_a_plain_state_dict(user_module, tmp_path, capsys):
    from safetensors.torch import save_file

    module = __import__(user_module)
    torch.manual_seed(0)
    model = module.build(in_channels=1, num_classes=3, input_size=10)
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    argv = ["pts", str(tmp_path / "weights.safetensors"), "--method", "magnitude", "--sparsity", "0.5",
            "--calibration-size", "32", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "name its architecture with --model" in capsys.readouterr().err
    assert main([*argv, "--model", f"{user_module}:build", "--dataset", f"{user_module}:data",
                 "--out", str(tmp_path / "b")]) == 0
    summary = summary_of(tmp_path / "b")
    assert summary["model"] == f"{user_module}:build" and abs(summary["sparsity_masked"] - 0.5) < 0.01
    sparse, _ = artifacts.load_model(tmp_path / "b" / "model.safetensors")
    # the magnitude method kept the largest of the user's own weights, unchanged
    masked, original = sparse[1].weight.detach(), model[1].weight.detach()
    kept = masked != 0
    assert 0.3 < kept.float().mean() < 0.7 and torch.equal(masked[kept], original[kept])
    assert original[kept].abs().min() >= original[~kept].abs().max()
    save_file({"other.weight": torch.zeros(2, 2)}, tmp_path / "wrong.safetensors")
    assert main(["pts", str(tmp_path / "wrong.safetensors"), "--model", f"{user_module}:build", "--dataset",
                 f"{user_module}:data", "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 2
    assert "does not match this model" in capsys.readouterr().err


def test_an_out_of_tree_post_training_method_by_import_path_and_by_register(user_module, tmp_path, capsys):
    dense = tmp_path / "dense"
    assert main(["train", "--model", "mlp", "--dataset", "synthetic", "--method", "dense", *SMALL,
                 "--out", str(dense)]) == 0
    common = ["--sparsity", "0.5", "--calibration-size", "32", "--no-progress"]
    spec = f"{user_module}:KeepSmallest"
    assert main(["pts", str(dense), "--method", spec, *common, "--out", str(tmp_path / "a")]) == 0
    summary = summary_of(tmp_path / "a")
    assert summary["method"] == spec and abs(summary["sparsity_masked"] - 0.5) < 0.01
    assert summary["options"] == {"recalibrate_bn": False, "flip": True} and summary["stage_seconds"].keys() == {
        "keep-smallest"}
    sparse, _ = artifacts.load_model(tmp_path / "a" / "model.safetensors")
    dense_model, _ = artifacts.load_model(dense / "model.safetensors")
    name = next(iter(regrow.masking.masked_layers(sparse)))
    kept = regrow.masking.mask_of(regrow.masking.masked_layers(sparse)[name])
    original = dict(dense_model.named_modules())[name].weight.detach().abs()
    assert original[kept].max() <= original[~kept].min()  # the smallest were kept, as the user's method says
    regrow.posttraining.register_pts("keep-smallest", __import__(user_module).KeepSmallest)
    assert "keep-smallest" in regrow.posttraining.pts_names()
    assert main(["pts", str(dense), "--method", "keep-smallest", "--opt", "flip=false", *common,
                 "--out", str(tmp_path / "b")]) == 0
    assert summary_of(tmp_path / "b")["options"]["flip"] is False
    capsys.readouterr()
    assert main(["pts", str(dense), "--method", "keep-smallest", "--opt", "bogus=1", *common,
                 "--out", str(tmp_path / "c")]) == 2
    assert "unknown option(s) bogus" in capsys.readouterr().err
    assert main(["pts", str(dense), "--method", f"{user_module}:build", *common, "--out", str(tmp_path / "d")]) == 2
    assert "is not a subclass of regrow.posttraining.PostTrainingMethod" in capsys.readouterr().err
    with pytest.raises(regrow.ConfigError, match="is taken by"):
        regrow.posttraining.register_pts("wanda", __import__(user_module).KeepSmallest)


def test_the_command_line_scans_installed_methods_only_when_it_needs_them(monkeypatch, capsys):
    from regrow.cli import build_parser

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(pts_methods, "_entry_points_loaded", False)
    build_parser()  # every start of the CLI builds it: no entry-point scan, no plugin import
    assert not registry._entry_points_loaded and not pts_methods._entry_points_loaded
    assert main(["train", "--help"]) == 0
    assert "rigl: interval=100" in capsys.readouterr().out and registry._entry_points_loaded


def test_a_users_token_model_trains_evaluates_and_exports(user_module, tmp_path, capsys):
    """Integer inputs (token ids) are kept as ids: an embedding model trains with a weight method, evaluates and
    exports, and is made sparse after training (Wanda, POT, UniPTS), channel structure included; what does not take
    ids (augmentation) says so in one line."""
    out = tmp_path / "run"
    common = ["--model", f"{user_module}:bag", "--dataset", f"{user_module}:tokens", "--batch-size", "32",
              "--no-progress", "--device", "cpu"]
    assert main(["train", *common, "--method", "rigl", "--sparsity", "0.5", "--opt", "interval=2", "--epochs", "8",
                 "--no-augment", "--out", str(out)]) == 0
    summary = summary_of(out)
    assert summary["test_accuracy"] > 0.6 and abs(summary["sparsity_masked"] - 0.5) < 0.01  # 3 classes
    assert "embedding.weight" in summary["left_dense"]  # an embedding is counted, and named as left dense
    masked, meta = artifacts.load_model(out / "model.safetensors")
    assert meta["input_dtype"] == "int64" and meta["input_max"] == 52 and meta["input_shape"] == [12]
    assert summary["macs_dense"] == 16 * 32 + 32 * 3  # measured on ids: the linears after the embedding
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main(["export", str(out), "--out", str(tmp_path / "exported.safetensors")]) == 0
    exported, _ = export.load_exported(tmp_path / "exported.safetensors")
    ids = torch.randint(0, 53, (5, 12))
    assert torch.allclose(exported.eval()(ids), masked.eval()(ids), atol=1e-6)
    assert main(["train", *common, "--method", "dense", "--no-augment", "--out", str(tmp_path / "dense")]) == 0
    quick = ["epochs=1", "batch_size=16", "population=4", "generations=2", "parents=2", "children=2", "mutants=1"]
    for method, options in (("wanda", []), ("pot", []), ("unipts", quick)):  # post-training sparsity on ids
        assert main(["pts", str(tmp_path / "dense"), "--method", method, "--sparsity", "0.5", "--no-progress",
                     "--calibration-size", "64", *[f"--opt={o}" for o in options],
                     "--out", str(tmp_path / f"pts-{method}")]) == 0, method
        pts_summary = summary_of(tmp_path / f"pts-{method}")
        assert pts_summary["sparsity_masked"] == pytest.approx(0.5, abs=0.02) and pts_summary["test_accuracy"] > 0.4
    # channel structure traces the model on ids: HALP prunes fc1's channels, the export equals the masked model
    halp = tmp_path / "halp"
    assert main(["train", *common, "--method", "halp", "--structure", "channel", "--latency-target", "0.5",
                 "--cost", "macs", "--no-augment", "--epochs", "2", "--opt", "prune_every=2", "--opt", "prune_steps=2",
                 "--out", str(halp)]) == 0
    assert summary_of(halp)["channels"]["kept_channels"]["fc1"] < 32
    assert main(["export", str(halp), "--out", str(tmp_path / "halp.safetensors")]) == 0
    masked, _ = artifacts.load_model(halp / "model.safetensors")
    exported, _ = export.load_exported(tmp_path / "halp.safetensors")
    assert exported.fc1.out_features == summary_of(halp)["channels"]["kept_channels"]["fc1"]
    assert torch.allclose(exported.eval()(ids), masked.eval()(ids), atol=1e-6)
    for argv, message in (
            (["train", *common, "--method", "rigl", "--out", str(tmp_path / "a")], "pass --no-augment"),
            (["eval", str(out / "model.safetensors"), "--dataset", "synthetic"], "takes token ids")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
