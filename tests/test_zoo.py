"""Models from the zoos (torchvision, timm, Hugging Face) built from configs, no download: regrow's masks, IEE and
UniPTS on them, through the same trainer and post-training runner as the registry models. Each test is skipped,
with the reason, where its library is not installed (``pip install regrow[zoo]``)."""

import json

import pytest
import torch
from torch import nn

import regrow
from conftest import train_on
from regrow import masking
from regrow.posttraining import PTSConfig, run_pts
from regrow.training import TrainConfig, build_trainer

IEE_SHORT = {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2}


def needs(module):
    try:
        if module in ("torchvision", "timm"):
            from regrow.zoo import import_torchvision
            import_torchvision()
        __import__(module)
    except Exception as e:  # noqa: BLE001 - a missing or broken install: skip with its reason
        pytest.skip(f"{module} is not usable here ({type(e).__name__}: {e}); pip install 'regrow[zoo]'")


def train(tmp_path, model, method, options, sparsity=0.8, **kw):
    config = TrainConfig(model=model, dataset="synthetic", synthetic_size=96, method=method, sparsity=sparsity,
                         epochs=2, batch_size=16, augment=False, progress=False, channels_last=False,
                         method_options=options, **kw)
    trainer = build_trainer(config, tmp_path / method)
    return trainer, trainer.run()


def images(g, steps, channels, size, classes):
    return [(torch.randn(8, channels, size, size, generator=g), torch.randint(0, classes, (8,), generator=g))
            for _ in range(steps)]


def assert_exactly_sparse(model, summary, sparsity):
    layers = masking.masked_layers(model)
    assert layers and summary["sparsity_masked"] == pytest.approx(sparsity, abs=2e-3)
    for name, module in layers.items():
        assert torch.count_nonzero(module.weight[~masking.mask_of(module)]) == 0, name


@pytest.mark.parametrize("method,options", [("rigl", {"interval": 2}), ("iee", IEE_SHORT)])
def test_torchvision_resnet18_trains_sparse(tmp_path, method, options):
    needs("torchvision")
    trainer, summary = train(tmp_path, "regrow.zoo:torchvision_resnet18", method, options)
    assert summary["mask_updates"] >= (2 if method == "rigl" else 1)  # IEE: one cycle fits 12 steps
    assert len(summary["layers"]) == 21  # 20 convs (3 of them 1×1 shortcuts) and the classifier
    assert_exactly_sparse(trainer.model, summary, 0.8)


def test_unipts_on_a_trained_torchvision_resnet18(tmp_path):
    needs("torchvision")
    train(tmp_path, "regrow.zoo:torchvision_resnet18", "dense", {}, sparsity=0.0)
    options = {"epochs": 1, "batch_size": 16, "population": 4, "generations": 2, "parents": 2, "children": 2,
               "mutants": 1}
    summary = run_pts(PTSConfig(method="unipts", sparsity=0.7, calibration_size=64, synthetic_size=96,
                                options=options, progress=False), tmp_path / "dense", tmp_path / "pts")
    assert summary["model"] == "regrow.zoo:torchvision_resnet18"
    assert summary["sparsity_masked"] == pytest.approx(0.7, abs=0.02)


def test_timm_vit_trains_sparse(tmp_path):
    needs("timm")
    trainer, summary = train(tmp_path, "regrow.zoo:timm_vit_tiny", "rigl", {"interval": 2})
    assert summary["mask_updates"] >= 2
    assert_exactly_sparse(trainer.model, summary, 0.8)
    # the attention projections are Linear layers, masked like the rest
    assert any(name.endswith("attn.qkv") for name in masking.masked_layers(trainer.model))


def test_timm_convnext_trains_sparse():
    needs("timm")
    from regrow.zoo import timm_convnext_atto

    torch.manual_seed(0)
    model = timm_convnext_atto(in_channels=3, num_classes=4)  # downsamples 32×: 32×32 inputs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = regrow.RigL(model, optimizer, sparsity=0.8, interval=2, total_steps=8)
    train_on(model, optimizer, sp, images(torch.Generator().manual_seed(0), 8, 3, 32, 4))
    assert len(sp.history) >= 2 and sp.actual_sparsity() == pytest.approx(0.8, abs=2e-3)
    assert any(m.groups == m.in_channels > 1 for m in sp.layers.values() if isinstance(m, nn.Conv2d))  # depthwise


@pytest.mark.parametrize("method,options", [("rigl", {"interval": 2}), ("iee", IEE_SHORT)])
def test_hugging_face_bert_from_config_trains_sparse(method, options):
    needs("transformers")
    from regrow.zoo import hf_bert_tiny

    torch.manual_seed(0)
    model = hf_bert_tiny(num_classes=3, input_size=12, vocab_size=60)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = regrow.create(method, model, optimizer, sparsity=0.8, total_steps=24, exclude=["model.classifier"],
                       **options)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 60, (16, 12), generator=g) for _ in range(24)]
    train_on(model, optimizer, sp, [(x, x[:, 0] % 3) for x in ids])
    assert len(sp.history) >= 2 and sp.actual_sparsity() == pytest.approx(0.8, abs=2e-3)
    assert "model.bert.encoder.layer.0.attention.self.query" in sp.layers
    for name, module in sp.layers.items():
        assert torch.count_nonzero(module.weight[~masking.mask_of(module)]) == 0, name


def test_vit_channel_pruning_prunes_whole_heads_and_exports_exactly(tmp_path):
    needs("timm")
    import warnings

    from regrow.export import export_masked_model, load_exported, save_exported
    from regrow.zoo import timm_vit_tiny

    torch.manual_seed(0)
    model = timm_vit_tiny(in_channels=1, num_classes=4, input_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning on cls_token / pos_embed, which it leaves to regrow
        sp = regrow.create("halp", model, optimizer, structure="channel", latency_target=0.6, cost="macs",
                           input_shape=(1, 16, 16), total_steps=20, prune_every=2, prune_steps=3)
    # The MLP hidden channels and the attention heads (3 per block, whole: q/k/v rows and proj columns) are pruned.
    assert {g.root for g in sp.groups} == {f"blocks.{i}.{part}" for i in range(12) for part in ("mlp.fc1", "attn")}
    assert all(g.size == 3 and g.unit == "head" for g in sp.groups if g.root.endswith("attn"))
    g = torch.Generator().manual_seed(0)
    train_on(model, optimizer, sp, images(g, 8, 1, 16, 4))
    assert len(sp.history) == 3 and sp.history[-1]["dropped_channels"] > 0
    heads = {g.root: int(k.sum()) for g, k in zip(sp.groups, sp.channels.keep) if g.unit == "head"}
    assert min(heads.values()) < 3
    x = torch.randn(4, 1, 16, 16, generator=g)
    model.eval()
    with torch.no_grad():
        want = model(x)
    dense_size = sum(p.numel() for p in model.parameters())
    exported, structure = export_masked_model(model, x)  # the masked model: its masks say which channels go
    assert sum(p.numel() for p in exported.parameters()) < dense_size
    modules = dict(exported.named_modules())
    for root, kept in heads.items():  # timm's own bookkeeping follows: fewer heads of the same size
        attn = modules[root]
        assert attn.num_heads == kept and attn.qkv.out_features == 3 * kept * attn.head_dim == 3 * attn.attn_dim
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want, rtol=1e-4, atol=1e-5)
    save_exported(tmp_path / "vit.safetensors", exported, structure)
    loaded, _ = load_exported(tmp_path / "vit.safetensors", timm_vit_tiny(in_channels=1, num_classes=4, input_size=16))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)


def test_bert_channel_pruning_prunes_whole_heads_and_exports_exactly():
    needs("transformers")
    from regrow.export import export_masked_model
    from regrow.zoo import hf_bert_tiny

    torch.manual_seed(0)
    model = hf_bert_tiny(num_classes=3, input_size=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = regrow.create("halp", model, optimizer, structure="channel", latency_target=0.4, cost="macs",
                       input_shape=(12,), input_dtype="int64", total_steps=20, prune_every=2, prune_steps=3)
    # q/k/v are viewed as 2 heads of 32: without the head groups the graph would couple them channel by channel,
    # which no export can reproduce (the heads' size is fixed); the FFN and pooler channels stay channel groups
    roots = {g.root: g.unit for g in sp.groups}
    layer = "model.bert.encoder.layer.{}."
    assert roots == {**{layer.format(i) + "attention": "head" for i in range(2)},
                     **{layer.format(i) + "intermediate.dense": "channel" for i in range(2)},
                     "model.bert.pooler.dense": "channel"}
    g = torch.Generator().manual_seed(0)
    train_on(model, optimizer, sp, [(torch.randint(1, 1000, (8, 12), generator=g),
                                     torch.randint(0, 3, (8,), generator=g)) for _ in range(8)])
    kept = {g.root: int(k.sum()) for g, k in zip(sp.groups, sp.channels.keep) if g.unit == "head"}
    assert min(kept.values()) == 1
    x = torch.randint(1, 1000, (4, 12), generator=g)
    model.eval()
    with torch.no_grad():
        want = model(x)
    exported, _ = export_masked_model(model, x)
    modules = dict(exported.named_modules())
    for root, heads in kept.items():
        assert modules[root].self.num_attention_heads == heads and modules[root].self.query.out_features == 32 * heads
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want, rtol=1e-4, atol=1e-5)


TOKENS = '''
import torch


def tokens():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = torch.randint(1, 900, (240, 12), generator=g)
    x[:, 0] = 900 + y  # a class token among eleven random ones
    return (x[:192], y[:192]), (x[192:], y[192:])
'''


def test_unipts_on_a_trained_hugging_face_bert(tmp_path, monkeypatch):
    needs("transformers")
    from regrow.cli import main

    (tmp_path / "zoo_tokens.py").write_text(TOKENS)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--model", "regrow.zoo:hf_bert_tiny", "--dataset", "zoo_tokens:tokens", "--no-progress",
              "--device", "cpu"]
    assert main(["train", *common, "--method", "dense", "--no-augment", "--epochs", "4", "--batch-size", "32",
                 "--lr", "0.05", "--out", str(tmp_path / "dense")]) == 0
    quick = ["epochs=1", "batch_size=16", "population=4", "generations=2", "parents=2", "children=2", "mutants=1"]
    assert main(["pts", str(tmp_path / "dense"), "--method", "unipts", "--sparsity", "0.6", "--no-progress",
                 "--calibration-size", "48", *[f"--opt={o}" for o in quick], "--out", str(tmp_path / "pts")]) == 0
    summary = json.loads((tmp_path / "pts" / "summary.json").read_text())
    assert summary["sparsity_masked"] == pytest.approx(0.6, abs=0.02)
    assert any(name.endswith("attention.self.query") for name in summary["layer_sparsities"])
    assert "search" in summary and summary["training"]["steps"] == 3  # 48 samples in batches of 16, one epoch


def test_a_bert_attention_whose_heads_cannot_be_pruned_is_left_whole(monkeypatch):
    """The graph couples BERT's q/k/v channel by channel (evenly), which no export reproduces: when the adapter
    refuses the heads, that group is left whole with the reason instead of trained into an unexportable model."""
    needs("transformers")
    from regrow.channels import heads
    from regrow.channels.groups import channel_groups
    from regrow.zoo import hf_bert_tiny

    monkeypatch.setattr(heads.BertAttention, "layout", lambda self, name, module: "a test refuses")
    groups = channel_groups(hf_bert_tiny(input_size=12), torch.ones(1, 12, dtype=torch.long))
    qkv = [g for g in groups if any(n.endswith("attention.self.query") and r == "out" for n, r, _ in g.members)]
    assert len(qkv) == 2 and all("attention heads not pruned: a test refuses" in g.excluded for g in qkv)
    assert not any(g.unit == "head" for g in groups)
    assert [g.excluded for g in groups if g.root.endswith("layer.0.intermediate.dense")] == [None]


def test_a_masked_language_models_decoder_tied_to_the_word_embeddings_is_left_dense_and_named():
    needs("transformers")
    from regrow import masking
    from regrow.zoo import _import

    transformers = _import("transformers", "huggingface")  # as the zoo imports it (torchvision's shim first)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=1, hidden_size=32,
                                                                 num_attention_heads=2, intermediate_size=64,
                                                                 vocab_size=100))
    assert masking.tied_weights(model) == {"cls.predictions.decoder": ["bert.embeddings.word_embeddings.weight"]}
    sp = regrow.create("rigl", model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    assert "cls.predictions.decoder" not in sp.layers and len(sp.layers) == 7  # q, k, v, out, ffn x2, transform
    left = masking.weight_sparsity(model, sp.skipped)["left_dense"]
    assert "tied weights" in left["bert.embeddings.word_embeddings.weight"]
