"""Attention heads as channel groups (regrow.channels.heads): a head is pruned whole and its export computes the
masked model's function. A small attention of our own (packed q/k/v reshaped into heads, like timm's) keeps these
tests independent of the zoos; test_zoo runs the built-in adapters on timm's ViT and Hugging Face's BERT."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import regrow
from conftest import CountingMeasure
from regrow import masking
from regrow.channels import heads
from regrow.channels.costs import LatencyTable, layer_shapes
from regrow.channels.groups import IN, OUT, ChannelMasks, channel_groups
from regrow.errors import ConfigError
from regrow.export import export_channels, export_masked_model, load_exported, save_exported


class PackedAttention(nn.Module):
    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # its scale comes from the head size: head *dims* must stay
        return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class TinyTransformer(nn.Module):
    """Tokens of 8 features -> 16 wide, one attention block and an MLP, mean-pooled to 3 classes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = PackedAttention()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x.mean(1))


class PackedAdapter(heads.AttentionAdapter):
    def __init__(self, refuse=None):
        self.refuse = refuse

    def matches(self, module):
        return isinstance(module, PackedAttention)

    def layout(self, name, module):
        if self.refuse:
            return self.refuse
        d = module.num_heads * module.head_dim
        return heads.HeadLayout(((f"{name}.qkv", (0, d, 2 * d)),), f"{name}.proj", module.num_heads, module.head_dim)

    def set_heads(self, module, num_heads):
        module.num_heads = num_heads


@pytest.fixture
def adapter(monkeypatch):
    monkeypatch.setattr(heads, "ADAPTERS", list(heads.ADAPTERS))
    return heads.register_attention(PackedAdapter())


X = torch.randn(1, 5, 8)


def attention_group(groups):
    return next(g for g in groups if "attn.qkv" in g.modules(OUT))


def test_without_an_adapter_the_heads_are_left_whole_with_the_reason(monkeypatch):
    monkeypatch.setattr(heads, "ADAPTERS", [])
    group = attention_group(channel_groups(TinyTransformer(), X))
    assert group.unit == "channel" and "attention heads" in group.excluded


def test_an_adapter_that_refuses_says_why_and_the_heads_stay(monkeypatch):
    monkeypatch.setattr(heads, "ADAPTERS", [PackedAdapter(refuse="a gate couples the heads")])
    groups = channel_groups(TinyTransformer(), X)
    group = attention_group(groups)
    assert group.excluded and "attention heads not pruned: a gate couples the heads" in group.excluded
    assert [g.excluded for g in groups if g.root == "fc1"] == [None]  # groups outside the attention are untouched


def test_a_head_group_owns_each_heads_q_k_v_rows_and_its_output_columns(adapter):
    group = attention_group(channel_groups(TinyTransformer(), X))
    assert (group.root, group.unit, group.size, group.chunk, group.excluded) == ("attn", "head", 4, 1, None)
    rows = dict((n, i) for n, r, i in group.members if r == OUT)["attn.qkv"]
    columns = dict((n, i) for n, r, i in group.members if r == IN)["attn.proj"]
    # head 1 of 4 (head size 4): rows 4..7 of q, 20..23 of k, 36..39 of v, in that order; output columns 4..7
    assert rows[12:24] == [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]
    assert columns[4:8] == [4, 5, 6, 7] and sorted(rows) == list(range(48))


def test_masked_heads_export_to_fewer_heads_with_the_same_outputs(adapter, tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    groups = [g for g in channel_groups(model, X) if not g.excluded]
    masks = ChannelMasks(model, groups)
    index = next(i for i, g in enumerate(groups) if g.unit == "head")
    masks.set_keep(index, torch.tensor([True, False, True, False]))
    x = torch.randn(6, 5, 8)
    with torch.no_grad():
        want = model(x)
        q_rows = masking.mask_of(model.attn.qkv).any(1)
        assert q_rows.sum() == 24 and not q_rows[4:8].any() and not q_rows[36:40].any()
    exported, structure = export_channels(model, masks, X)
    assert structure["kept"]["attn"] == [0, 2]
    assert exported.attn.num_heads == 2 and exported.attn.qkv.out_features == 24 and exported.attn.proj.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-6)
    save_exported(tmp_path / "small.safetensors", exported, structure)
    loaded, _ = load_exported(tmp_path / "small.safetensors", TinyTransformer())
    assert loaded.attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)


def train(model, optimizer, sp, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sp.step()


@pytest.mark.parametrize("method", ["halp", "iee"])
def test_halp_and_iee_prune_whole_heads_within_the_budget_and_export_exactly(adapter, method):
    torch.manual_seed(0)
    model = TinyTransformer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"prune_every": 2, "prune_steps": 3} if method == "halp" else \
        {"estimate_steps": 2, "improve_steps": 1, "explore_steps": 2}
    sp = regrow.create(method, model, optimizer, structure="channel", latency_target=0.4, cost="macs",
                       input_shape=(5, 8), total_steps=30, group_size=4, **options)
    index = next(i for i, g in enumerate(sp.groups) if g.unit == "head")
    train(model, optimizer, sp, 30)
    kept_heads = int(sp.channels.keep[index].sum())
    assert 1 <= kept_heads < 4  # at 40 % of the MACs the heads are pruned too, one at a time (no chunk of G=4)
    assert sp.predicted_cost() <= sp.budget * (1 + 1e-9)
    report = sp.budget_report()
    assert report["head_groups"] == ["attn"] and report["kept_channels"]["attn"] == kept_heads
    # the cost model saw the kept heads' rows: qkv's output width is 3 * head size per head
    widths = sp.allocator.channel_widths(sp.kept_counts())
    assert widths["attn.qkv"][1] == kept_heads * 12 and widths["attn.proj"][0] == kept_heads * 4
    x = torch.randn(4, 5, 8)
    model.eval()
    with torch.no_grad():
        want = model(x)
    exported, structure = export_masked_model(model, X)  # from the masks alone, as `regrow export` does
    assert exported.attn.num_heads == kept_heads and len(structure["kept"]["attn"]) == kept_heads
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-6)


def test_a_latency_table_is_asked_only_for_widths_in_its_precomputed_grid(adapter, tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    measure = CountingMeasure()
    table = LatencyTable(layer_shapes(model, X), cache_dir=tmp_path, measure=measure, key="cpu|heads")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = regrow.create("halp", model, optimizer, structure="channel", cost_model=table, latency_target=0.5,
                       input_shape=(5, 8), total_steps=20, group_size=4, prune_every=2, prune_steps=3)
    sp.precompute_costs()
    before = measure.calls
    train(model, optimizer, sp, 20)
    assert measure.calls == before
    assert int(sp.channels.keep[next(i for i, g in enumerate(sp.groups) if g.unit == "head")].sum()) < 4


def test_removing_every_head_is_refused(adapter):
    model = TinyTransformer()
    groups = [g for g in channel_groups(model, X) if not g.excluded]
    masks = ChannelMasks(model, groups)
    masks.set_keep(next(i for i, g in enumerate(groups) if g.unit == "head"), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="every head"):
        export_channels(model, masks, X)


class SeparateAttention(nn.Module):
    """q, k and v as separate layers viewed as heads of a fixed size (as Hugging Face's BERT does); v also feeds a
    gate outside the attention when ``leak``."""

    def __init__(self, dim=16, num_heads=4, leak=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.gate = nn.Linear(dim, dim) if leak else None

    def forward(self, x):
        b, n, _ = x.shape
        v = self.v(x)
        q, k, vh = (t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x), v))
        y = self.out(F.scaled_dot_product_attention(q, k, vh).transpose(1, 2).reshape(b, n, -1))
        return y if self.gate is None else y * torch.sigmoid(self.gate(v))


class SeparateAdapter(heads.AttentionAdapter):
    def matches(self, module):
        return isinstance(module, SeparateAttention)

    def layout(self, name, module):
        return heads.HeadLayout(tuple((f"{name}.{p}", (0,)) for p in "qkv"), f"{name}.out", module.num_heads,
                                module.head_dim)

    def set_heads(self, module, num_heads):
        module.num_heads = num_heads


@pytest.mark.parametrize("leak", [False, True])
def test_separate_q_k_v_become_heads_unless_tied_to_a_layer_outside(monkeypatch, leak):
    """The graph couples separate q/k/v with the output projection channel by channel (evenly), which no export can
    reproduce: with an adapter they become one head group; when v also feeds a layer outside the attention, that
    group is left whole with the reason instead."""
    monkeypatch.setattr(heads, "ADAPTERS", [SeparateAdapter()])
    model = TinyTransformer()
    model.attn = SeparateAttention(leak=leak)
    groups = channel_groups(model, X)
    tied = [g for g in groups if "attn.q" in g.modules(OUT)]
    assert len(tied) == 1
    if leak:
        assert tied[0].unit == "channel" and "couples the heads of attn with layers outside them" in tied[0].excluded
    else:
        assert (tied[0].unit, tied[0].size, tied[0].excluded) == ("head", 4, None)
