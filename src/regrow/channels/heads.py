"""Attention heads as channel groups: a head is pruned whole, in every projection that produces it and in the layer
that reads it back.

The dependency graph sees an attention block's packed q/k/v projection reshaped into heads and couples its rows
with the output projection's columns unevenly, so single channels cannot go (:func:`groups.exclusion` leaves that
group whole). A whole head can: with its q, k and v rows masked, the head attends uniformly over zero values and
adds nothing, and the output projection's columns for it are masked too, so removing the head computes the same
function. Removing a head also changes the module's own bookkeeping (its head count), which only code that knows
the module can do: an :class:`AttentionAdapter` per attention class says where the heads live and how to shrink
it. timm's ``Attention`` (ViT, DeiT) and Hugging Face's BERT-style attention (BERT, RoBERTa, MiniLM) ship here;
:func:`register_attention` adds others.

Only whole heads, not head dimensions: an exported head of fewer dimensions would change the softmax scale that
torch's fused attention derives from the head size, so it would not compute the masked model's function.
The attention products themselves (N² per head) are not in regrow's cost models, which price the projections:
a pruned head saves more than its predicted cost says.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .groups import IN, OUT, REFINERS, ChannelGroup


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one attention module live.

    ``projections``: the layers producing the heads, each with the row offset of every section it packs (a
    packed q/k/v projection has three: 0, d, 2d; separate q, k and v layers have one each). Head ``h`` owns rows
    ``offset + h·head_dim + j`` of each section. ``output``: the layer whose input column ``h·head_dim + j`` reads
    head ``h``."""

    projections: tuple[tuple[str, tuple[int, ...]], ...]
    output: str
    num_heads: int
    head_dim: int

    def group(self, root: str) -> ChannelGroup:
        """The head group, its members' indices ordered head by head (what ``ChannelMasks`` expands over)."""
        members = []
        for layer, offsets in self.projections:
            rows = [o + h * self.head_dim + j for h in range(self.num_heads) for o in offsets
                    for j in range(self.head_dim)]
            members.append((layer, OUT, rows))
        columns = [h * self.head_dim + j for h in range(self.num_heads) for j in range(self.head_dim)]
        members.append((self.output, IN, columns))
        return ChannelGroup(root=root, size=self.num_heads, members=members, unit="head", chunk=1)


class AttentionAdapter:
    """How to find and shrink the heads of one kind of attention module (subclass and :func:`register_attention`)."""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def layout(self, name: str, module: nn.Module) -> HeadLayout | str:
        """The heads' layout (layer names relative to the model, i.e. prefixed by ``name``), or why this instance's
        heads cannot be pruned exactly."""
        raise NotImplementedError

    def set_heads(self, module: nn.Module, num_heads: int) -> None:
        """After the projections lost the rows and columns of the removed heads: record the new head count."""
        raise NotImplementedError


class TimmAttention(AttentionAdapter):
    """timm's ``Attention`` (ViT, DeiT, ...): a packed ``qkv`` Linear reshaped to (3, heads, head_dim), ``proj``."""

    def matches(self, module: nn.Module) -> bool:
        return (type(module).__name__ == "Attention" and type(module).__module__.startswith("timm.")
                and all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "head_dim", "attn_dim")))

    def layout(self, name: str, module: nn.Module) -> HeadLayout | str:
        if getattr(module, "gate", None) is not None:
            return "a gated attention (its gate is not pruned with the heads)"
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            return "a norm over all heads (scale_norm) couples them"
        d = module.attn_dim
        if module.qkv.out_features != 3 * d or module.proj.in_features != d or d != module.num_heads * module.head_dim:
            return (f"qkv/proj widths {module.qkv.out_features}/{module.proj.in_features} do not fit "
                    f"{module.num_heads} heads")
        return HeadLayout(((f"{name}.qkv", (0, d, 2 * d)),), f"{name}.proj", module.num_heads, module.head_dim)

    def set_heads(self, module: nn.Module, num_heads: int) -> None:
        module.num_heads = num_heads
        module.attn_dim = num_heads * module.head_dim  # head_dim, and with it the softmax scale, stay


class BertAttention(AttentionAdapter):
    """Hugging Face BERT-style attention (BERT, RoBERTa, MiniLM, ...): ``self.query/key/value`` Linears viewed as
    (heads, head size), ``output.dense`` reading the heads back."""

    def matches(self, module: nn.Module) -> bool:
        inner, output = getattr(module, "self", None), getattr(module, "output", None)
        return (type(module).__module__.startswith("transformers.") and inner is not None
                and all(isinstance(getattr(inner, a, None), nn.Linear) for a in ("query", "key", "value"))
                and hasattr(inner, "attention_head_size") and hasattr(inner, "num_attention_heads")
                and isinstance(getattr(output, "dense", None), nn.Linear))

    def layout(self, name: str, module: nn.Module) -> HeadLayout | str:
        inner = module.self
        heads, size = inner.num_attention_heads, inner.attention_head_size
        widths = {inner.query.out_features, inner.key.out_features, inner.value.out_features,
                  module.output.dense.in_features}
        if widths != {heads * size}:
            return f"projection widths {sorted(widths)} do not fit {heads} heads of {size}"
        return HeadLayout(tuple((f"{name}.self.{p}", (0,)) for p in ("query", "key", "value")),
                          f"{name}.output.dense", heads, size)

    def set_heads(self, module: nn.Module, num_heads: int) -> None:
        module.self.num_attention_heads = num_heads
        module.self.all_head_size = num_heads * module.self.attention_head_size  # the head size and scale stay


ADAPTERS: list[AttentionAdapter] = [TimmAttention(), BertAttention()]


def register_attention(adapter: AttentionAdapter) -> AttentionAdapter:
    """Teach regrow the heads of another attention class (tried before the built-in ones)."""
    ADAPTERS.insert(0, adapter)
    return adapter


def adapter_for(module: nn.Module) -> AttentionAdapter | None:
    return next((a for a in ADAPTERS if a.matches(module)), None)


def head_groups(model: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """``groups`` (from the dependency graph) with each recognised attention module's head group in place of the
    graph's groups that cover exactly its projections' output rows and its output layer's input columns. Where
    the graph couples anything else to them, those groups are left whole, with the reason."""
    result = list(groups)
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        layout = adapter.layout(name, module)
        if isinstance(layout, str):
            # Groups that live inside this attention couple its projections through the heads: channel by channel
            # they could never be exported, and whole heads are refused, so they stay whole with both reasons.
            for g in result:
                if all(m.startswith(f"{name}.") for m in g.modules()):
                    g.excluded = (f"{g.excluded}; " if g.excluded else "") + f"attention heads not pruned: {layout}"
            continue
        heads = layout.group(name)
        wanted = {(n, r) for n, r, _ in heads.members}
        covering = [g for g in result if any((n, r) in wanted for n, r, _ in g.members)]
        if covering and {(n, r) for g in covering for n, r, _ in g.members} == wanted:
            at = result.index(covering[0])
            result = [g for g in result if g not in covering]
            result.insert(at, heads)
        else:  # the graph ties the heads' rows to other layers: neither heads nor single channels export exactly
            for g in covering:
                if not g.excluded:
                    g.excluded = (f"couples the heads of {name} with layers outside them: not pruned channel by "
                                  "channel (a head's rows and columns would be cut apart)")
    return result


REFINERS.append(head_groups)
