"""Channel structure: which channels are pruned together (``groups``; whole attention heads: ``heads``), what a
model with fewer channels costs (``costs``: a latency table measured on this device, or MACs), and which channels
to keep under a budget (``budget``: HALP's prefix knapsack). The channel methods (HALP, IEE for channels) are in
``regrow.methods``."""

from . import heads  # noqa: F401,E402 - registers the head groups with channel_groups
