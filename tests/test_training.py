import dataclasses
import hashlib
import json

import pytest
import torch

from regrow.errors import CheckpointError, ConfigError, TrainingDivergedError
from regrow.methods.channel import CHANNEL_PAPER_CYCLE
from regrow.training import (
    CHECKPOINT,
    METRICS,
    MODEL,
    SUMMARY,
    TrainConfig,
    build_trainer,
    load_model,
    resolve_latency_ms,
)


def config(**kw):
    base = dict(model="resnet8", dataset="synthetic", synthetic_size=256, method="rigl", sparsity=0.8,
                epochs=2, batch_size=32, log_every=3, progress=False, seed=0,
                method_options={"interval": 4})
    base.update(kw)
    return TrainConfig(**base)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, method):
    options = {"interval": 4}
    full = build_trainer(config(method=method, method_options=options), tmp_path / "full").run()
    # Stop after step 7 (mid-epoch, between mask updates), then resume in a fresh trainer.
    assert build_trainer(config(method=method, method_options=options, checkpoint_every=7),
                   tmp_path / "cut").run(stop_after=7) is None
    resumed = build_trainer(config(method=method, method_options=options, checkpoint_every=7),
                      tmp_path / "cut").run(resume=True)
    a, _ = load_model(tmp_path / "full" / MODEL)
    b, _ = load_model(tmp_path / "cut" / MODEL)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert (tmp_path / "full" / METRICS).read_text() == (tmp_path / "cut" / METRICS).read_text()
    for key in ("test_accuracy", "train_flops", "sparsity_actual", "mask_updates", "test_accuracy_per_epoch"):
        assert full[key] == resumed[key], key
    assert full["mask_updates"] > 0


def test_summary_has_the_contract_fields(tmp_path):
    s = build_trainer(config(epochs=1), tmp_path).run()
    on_disk = json.loads((tmp_path / SUMMARY).read_text())
    for key in ("method", "sparsity_target", "sparsity_actual", "test_accuracy", "train_flops",
                "dense_train_flops", "wall_seconds", "layers"):
        assert key in on_disk
    assert 0.0 <= s["test_accuracy"] <= 1.0
    assert s["sparsity_actual"] == pytest.approx(0.8, abs=1e-4)
    assert 0 < s["train_flops"] < s["dense_train_flops"]
    assert all({"name", "numel", "density", "dead_outputs", "dead_inputs"} <= set(layer) for layer in s["layers"])
    # what the method ran with, defaults resolved: the config records only the options given
    assert on_disk["config"]["method_options"] == {"interval": 4}
    assert on_disk["method_options"]["interval"] == 4 and on_disk["method_options"]["alpha"] == 0.3


def test_dense_method_has_no_masks_and_costs_dense_flops(tmp_path):
    s = build_trainer(config(method="dense", epochs=3, method_options={}), tmp_path).run()
    assert s["sparsity_actual"] == 0.0 and s["train_flops"] == s["dense_train_flops"]
    assert s["test_accuracy"] > 0.8  # the synthetic data is learnable: 4 classes, chance is 0.25
    assert all(layer["density"] == 1.0 and layer["dead_outputs"] == layer["dead_inputs"] == 0 for layer in s["layers"])


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    build_trainer(config(checkpoint_every=5), tmp_path).run(stop_after=5)
    before = digest(tmp_path / CHECKPOINT)
    trainer = build_trainer(config(checkpoint_every=5), tmp_path)
    trainer.train_data.images[:] = float("nan")
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 6"):
        trainer.run(resume=True)
    assert digest(tmp_path / CHECKPOINT) == before
    assert not (tmp_path / MODEL).exists()


def test_existing_run_is_not_overwritten_and_resume_checks_the_config(tmp_path):
    build_trainer(config(epochs=1), tmp_path).run()
    before = digest(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="already holds a run"):
        build_trainer(config(epochs=1), tmp_path).run()
    with pytest.raises(CheckpointError, match="configuration differs.*sparsity"):
        build_trainer(config(epochs=1, sparsity=0.5), tmp_path).run(resume=True)
    assert digest(tmp_path / CHECKPOINT) == before


def test_resume_refuses_a_method_default_changed_since_the_checkpoint(tmp_path, monkeypatch):
    """The checkpoint records the method's defaults: a default changed since (as IEE's never_active did) is a clear
    refusal, not a run that switches method mid-way; giving the saved value back resumes, as does giving a
    default's value explicitly."""
    import regrow.training as training
    build_trainer(config(epochs=2, checkpoint_every=5), tmp_path).run(stop_after=5)
    real = training.method_defaults
    monkeypatch.setattr(training, "method_defaults", lambda cls: {**real(cls), "alpha": 0.1})
    with pytest.raises(CheckpointError, match=r"method's options differ \(alpha: 0.3 -> 0.1\).*--opt key=value"):
        build_trainer(config(epochs=2, checkpoint_every=5), tmp_path).run(resume=True)
    given_back = config(epochs=2, checkpoint_every=5, method_options={"interval": 4, "alpha": 0.3})
    assert build_trainer(given_back, tmp_path).run(resume=True)["steps"] > 5
    monkeypatch.undo()
    build_trainer(config(epochs=2, checkpoint_every=5), tmp_path / "b").run(stop_after=5)
    explicit = config(epochs=2, checkpoint_every=5, method_options={"interval": 4, "t_end": 0.75})
    assert build_trainer(explicit, tmp_path / "b").run(resume=True)["steps"] > 5
    with pytest.raises(CheckpointError, match=r"method's options differ \(interval: 4 -> 5\)"):
        build_trainer(config(epochs=2, method_options={"interval": 5}), tmp_path / "b").run(resume=True)


def test_a_budget_in_milliseconds_is_that_share_of_the_dense_forward_measured_once(tmp_path, monkeypatch):
    from regrow import latency_report

    batches = []

    def dense_in(ms):
        def timing(models, x, passes=3, repeats=50, reference="dense"):
            batches.append(x.shape[0])
            return {"dense": {"ms": ms, "speedup": 1.0, "pass_speedups": [1.0] * passes}}
        return timing

    monkeypatch.setattr(latency_report, "paired_timing", dense_in(40.0))
    monkeypatch.setenv("REGROW_CACHE_DIR", str(tmp_path / "cache"))
    from regrow.channels import costs  # a table that prices channels, not this machine: the floor is fixed
    monkeypatch.setattr(costs, "time_layer", lambda shape, c_in, c_out, *args, **kw: 1e-3 * (c_in * c_out + 1))
    halp = config(method="halp", structure="channel", latency_target_ms=12.0, latency_batch=2, checkpoint_every=3,
                  method_options={"prune_every": 2, "prune_steps": 2, "prune_first": True})
    resolved, info = resolve_latency_ms(halp, tmp_path / "run")
    assert resolved.latency_target == pytest.approx(0.3) and resolved.latency_dense_ms == 40.0 and info["measured"]
    assert batches == [2] and halp.latency_dense_ms is None  # timed at the table's batch; the config left alone
    trainer = build_trainer(halp, tmp_path / "run")  # the Python API: the trainer converts a budget in ms itself
    assert trainer.sparsifier.latency_target == pytest.approx(0.3) and len(batches) == 2
    trainer.run(stop_after=3)
    # a resume keeps the dense latency the run started with: timing it again would move the budget mid-run
    monkeypatch.setattr(latency_report, "paired_timing", lambda *a, **k: pytest.fail("timed again"))
    summary = build_trainer(halp, tmp_path / "run").run(resume=True)
    assert summary["config"]["latency_target"] == pytest.approx(0.3) and summary["config"]["latency_dense_ms"] == 40.0
    assert summary["steps"] > 3
    # another time is another budget: measured anew, and a resume refuses the change
    monkeypatch.setattr(latency_report, "paired_timing", dense_in(40.0))
    with pytest.raises(CheckpointError, match=r"configuration differs \(latency_target: 0.3 -> 0.275"):
        build_trainer(dataclasses.replace(halp, latency_target_ms=11.0), tmp_path / "run").run(resume=True)
    with pytest.raises(ConfigError, match="nothing to prune"):
        resolve_latency_ms(dataclasses.replace(halp, latency_target_ms=40.0), tmp_path / "other")
    assert resolve_latency_ms(config(), tmp_path / "rigl") == (config(), None)  # a sparsity, not a time


def test_an_iee_checkpoint_older_than_recorded_defaults_resumes_only_as_it_ran(tmp_path):
    """A checkpoint from before method defaults were recorded ran IEE with Θ_K frozen and α = 0.3 (the defaults
    then), and with a never_active that changed among such checkpoints: resuming at today's defaults would switch
    the method mid-way, so it is refused until the old values are given back."""
    from regrow import checkpoint
    iee = {"estimate_steps": 2, "improve_steps": 2, "explore_steps": 2}
    build_trainer(config(method="iee", method_options=iee, checkpoint_every=5), tmp_path).run(stop_after=5)
    sections, meta = checkpoint.load(tmp_path / CHECKPOINT)
    del meta["method_defaults"]
    checkpoint.save(tmp_path / CHECKPOINT, sections, meta)

    def resume(**options):
        return build_trainer(config(method="iee", method_options={**iee, **options}, checkpoint_every=5),
                             tmp_path).run(resume=True)
    with pytest.raises(CheckpointError, match=r"before checkpoints recorded .* never_active has changed.*--opt"):
        resume()
    with pytest.raises(CheckpointError, match=r"options differ \(alpha: 0.3 -> 0.1, freeze_active: True -> False\)"):
        resume(never_active="zero")
    assert resume(never_active="zero", freeze_active=True, alpha=0.3)["steps"] > 5
    # IEE for channels shares the method's name, not these options: it ran the paper's channel cycle then
    def channel(**options):
        return config(method="iee", structure="channel", cost="macs", latency_target=0.6,
                      method_options={**iee, **options}, checkpoint_every=5)
    build_trainer(channel(), tmp_path / "channel").run(stop_after=5)
    sections, meta = checkpoint.load(tmp_path / "channel" / CHECKPOINT)
    del meta["method_defaults"]
    checkpoint.save(tmp_path / "channel" / CHECKPOINT, sections, meta)
    with pytest.raises(CheckpointError, match=r"options differ \(explore_from: 'remembered' -> 'zero', "
                                              r"freeze_active: True -> False, ramp_cycles: 0 -> None\)"):
        build_trainer(channel(), tmp_path / "channel").run(resume=True)
    paper = channel(**CHANNEL_PAPER_CYCLE, ramp_cycles=0)  # and its straight first cut, before the ramp
    assert build_trainer(paper, tmp_path / "channel").run(resume=True)["steps"] > 5


def test_a_checkpoint_from_before_an_option_existed_resumes_only_as_it_ran(tmp_path):
    """IEE for channels explored from the remembered values before ``explore_from`` existed; a checkpoint that
    records its defaults but not that option ran so, and is refused at today's default (zero) until it is given."""
    from regrow import checkpoint
    options = {"estimate_steps": 2, "improve_steps": 2, "explore_steps": 2, "freeze_active": True}
    channel = config(method="iee", structure="channel", cost="macs", latency_target=0.6, method_options=options,
                     checkpoint_every=5)
    build_trainer(channel, tmp_path).run(stop_after=5)
    sections, meta = checkpoint.load(tmp_path / CHECKPOINT)
    assert meta["method_defaults"]["explore_from"] == "zero"
    del meta["method_defaults"]["explore_from"]
    checkpoint.save(tmp_path / CHECKPOINT, sections, meta)
    with pytest.raises(CheckpointError, match=r"options differ \(explore_from: 'remembered' -> 'zero'\)"):
        build_trainer(channel, tmp_path).run(resume=True)
    given = dataclasses.replace(channel, method_options={**options, "explore_from": "remembered"})
    assert build_trainer(given, tmp_path).run(resume=True)["steps"] > 5


def test_a_checkpoint_from_before_a_default_changed_resumes_only_as_it_ran(tmp_path):
    """IEE for channels cut straight to its budget (``ramp_cycles=0``) before the ramp became its default: a checkpoint
    that records that default is refused at today's until it is given back, even where the run's cycles are few
    enough that the ramp would cut straight too (the options are compared, not what they come to)."""
    from regrow import checkpoint
    options = {"estimate_steps": 2, "improve_steps": 2, "explore_steps": 2}
    channel = config(method="iee", structure="channel", cost="macs", latency_target=0.6, method_options=options,
                     checkpoint_every=5)
    build_trainer(channel, tmp_path).run(stop_after=5)
    sections, meta = checkpoint.load(tmp_path / CHECKPOINT)
    assert meta["method_defaults"]["ramp_cycles"] is None
    meta["method_defaults"]["ramp_cycles"] = 0
    checkpoint.save(tmp_path / CHECKPOINT, sections, meta)
    with pytest.raises(CheckpointError, match=r"options differ \(ramp_cycles: 0 -> None\).*--opt key=value"):
        build_trainer(channel, tmp_path).run(resume=True)
    given = dataclasses.replace(channel, method_options={**options, "ramp_cycles": 0})
    assert build_trainer(given, tmp_path).run(resume=True)["steps"] > 5


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    build_trainer(config(epochs=1), tmp_path).run()
    with pytest.raises(CheckpointError, match="resnet8 checkpoint, not resnet20"):
        load_model(tmp_path / MODEL, expect_model="resnet20")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")


def test_bad_training_options(tmp_path):
    for bad in (dict(epochs=0), dict(batch_size=-1), dict(lr=float("nan")), dict(sparsity=1.0)):
        with pytest.raises(ConfigError):
            build_trainer(config(**bad), tmp_path)


def test_channels_last_trains_the_same_masked_network(tmp_path):
    options = {"estimate_steps": 3, "improve_steps": 2, "explore_steps": 3}
    standard = build_trainer(config(method="iee", method_options=options, channels_last=False), tmp_path / "a")
    nhwc = build_trainer(config(method="iee", method_options=options, channels_last=True), tmp_path / "b")
    a, b = standard.run(), nhwc.run()
    conv = nhwc.model.layer1[0].conv1
    assert conv.weight_mask.is_contiguous(memory_format=torch.channels_last)
    assert a["sparsity_actual"] == b["sparsity_actual"] and a["mask_updates"] == b["mask_updates"]
    assert abs(a["test_accuracy"] - b["test_accuracy"]) < 0.05  # same math, another summation order


def test_resume_with_another_thread_count_warns(tmp_path):
    build_trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(stop_after=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(UserWarning, match=f"threads {threads + 1}; it was saved with {threads}"):
            build_trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(resume=True)
    finally:
        torch.set_num_threads(threads)


def test_a_damaged_metrics_file_does_not_block_resume(tmp_path):
    build_trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(stop_after=4)
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a crash
    with pytest.warns(UserWarning, match="1 damaged line"):
        summary = build_trainer(config(epochs=2, checkpoint_every=4), tmp_path).run(resume=True)
    assert summary["steps"] > 4
    assert all(json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines())


def test_a_trainer_handed_its_pieces_trains_them_with_its_loss_and_lr_schedule(tmp_path):
    import regrow
    from regrow.data import load_dataset
    from regrow.models import create_model
    from regrow.training import Trainer

    c = config(model="mlp", method="set", log_every=1, max_steps=12, channels_last=False)
    train, test = (load_dataset("synthetic", split, synthetic_size=256) for split in ("train", "test"))
    # the same pieces build_trainer makes, built by hand: the same run, bit for bit
    torch.manual_seed(c.seed)
    model = create_model("mlp", in_channels=1, num_classes=4, input_size=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=True,
                                weight_decay=c.weight_decay)
    sp = regrow.SET(model, optimizer, sparsity=0.8, total_steps=12, seed=c.seed, interval=4)
    by_hand = Trainer(model, optimizer, sp, train, test, tmp_path / "hand", config=c).run()
    built = build_trainer(c, tmp_path / "built").run()
    assert by_hand["test_accuracy"] == built["test_accuracy"]
    assert (tmp_path / "hand" / METRICS).read_text() == (tmp_path / "built" / METRICS).read_text()

    # a loss and a learning-rate schedule of one's own are the ones used
    calls = []

    def loss_fn(logits, y):
        calls.append(len(y))
        return torch.nn.functional.multi_margin_loss(logits, y)

    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=4, input_size=12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sp = regrow.RigL(model, optimizer, sparsity=0.8, total_steps=12, interval=4)
    with pytest.raises(ConfigError, match="recorded as another method"):
        Trainer(model, optimizer, sp, train, test, tmp_path / "own", config=c)
    rigl = config(model="mlp", method="rigl", log_every=1, max_steps=12, channels_last=False)
    Trainer(model, optimizer, sp, train, test, tmp_path / "own", config=rigl, loss_fn=loss_fn,
            lr_schedule=lambda step: 1e-3 / (1 + step)).run()
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "own" / METRICS).read_text().splitlines()) if "lr" in r]
    assert len(calls) == 12 and lrs == pytest.approx([1e-3 / (1 + s) for s in range(12)])
    model, _ = load_model(tmp_path / "own" / MODEL)  # rebuilt from config.model
    assert abs(regrow.masking.weight_sparsity(model)["sparsity"] - 0.8) < 0.01


def test_a_trainer_refuses_a_model_its_config_would_not_rebuild(tmp_path):
    import regrow
    from regrow.data import load_dataset
    from regrow.training import Trainer

    train = load_dataset("synthetic", "train", synthetic_size=64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = regrow.Static(model, optimizer, sparsity=0.5)
    with pytest.raises(ConfigError, match="builds another architecture than the model given"):
        Trainer(model, optimizer, sp, train, train, tmp_path, config=config(model="mlp", method="static"))
    model = __import__("regrow").create_model("mlp", in_channels=1, num_classes=4, input_size=12)
    sp = regrow.Static(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5)
    with pytest.raises(ConfigError, match="the config records"):
        Trainer(model, sp.optimizer, sp, train, train, tmp_path, config=config(model="mlp", method="static"))
    assert not any(tmp_path.iterdir())


def test_a_trainer_with_a_teacher_distils_and_evaluates_every_n_epochs(tmp_path):
    import regrow
    from regrow.data import load_dataset
    from regrow.models import create_model
    from regrow.training import Trainer

    c = config(model="mlp", method="static", epochs=3, log_every=1, eval_every=2, channels_last=False)
    train, test = (load_dataset("synthetic", split, synthetic_size=64) for split in ("train", "test"))
    torch.manual_seed(1)
    teacher = create_model("mlp", in_channels=1, num_classes=4, input_size=12).eval()
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=4, input_size=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = regrow.Static(model, optimizer, sparsity=0.8)
    seen = []

    def distil(logits, labels, teacher_logits, epoch):
        seen.append(epoch)
        with torch.no_grad():
            assert torch.equal(teacher_logits, teacher(last_batch[0]))
        return torch.nn.functional.mse_loss(logits, teacher_logits)

    last_batch = []
    teacher.register_forward_pre_hook(lambda m, inputs: last_batch.insert(0, inputs[0]))
    with pytest.raises(ConfigError, match="needs a loss_fn"):
        Trainer(model, optimizer, sp, train, test, tmp_path / "x", config=c, teacher=teacher)
    summary = Trainer(model, optimizer, sp, train, test, tmp_path / "run", config=c, loss_fn=distil,
                      teacher=teacher).run()
    assert seen == [0, 0, 1, 1, 2, 2] and summary["evaluated_epochs"] == [1, 2]
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    per_sample = 3 * 2 * summary["macs_sparse"] + 2 * summary["macs_dense"]  # student 3×, teacher 1× (dense)
    assert summary["train_flops"] == pytest.approx(64 * 3 * per_sample, rel=1e-9)
    with pytest.raises(ConfigError, match="eval_every"):
        config(eval_every=0).validate()
