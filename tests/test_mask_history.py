import pytest
import torch

from regrow.errors import ConfigError
from regrow.mask_history import MaskTracker, iou, pack, unpack


def units(*active, n=8):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(active)] = True
    return mask


def test_pack_round_trip():
    bits = torch.rand(1001) > 0.5
    assert torch.equal(unpack(pack(bits), 1001), bits)
    assert pack(bits).numel() == 126


def hand_built_tracker():
    """Start {0,1,2,3}; update 1 prunes {2,3} grows {3,4} (3 re-admitted); update 2 prunes {0,4} grows {0,5}
    (0 re-admitted); update 3 prunes {1,3} grows {2,6} (2 was active at the start, 6 never)."""
    t = MaskTracker()
    start, m1, m2, m3 = units(0, 1, 2, 3), units(0, 1, 3, 4), units(0, 1, 3, 5), units(0, 2, 5, 6)
    # two layers, to check that units are indexed over the layers concatenated in order
    split = lambda m: {"a": m[:3], "b": m[3:]}  # noqa: E731
    t.record(10, split(start), split(m1), pruned=split(units(2, 3)))
    t.record(20, split(m1), split(m2), pruned=split(units(0, 4)))
    t.record(30, split(m2), split(m3), pruned=split(units(1, 3)))
    return t, [m1, m2, m3]


def test_mask_metrics_against_hand_computed_values():
    t, masks = hand_built_tracker()
    assert all(torch.equal(a, b) for a, b in zip(t.masks(), masks))
    m = t.metrics()
    assert m["updates"] == 3 and m["steps"] == [10, 20, 30]
    assert m["pruned"] == m["grown"] == [2, 2, 2]
    assert m["readmitted"] == [0.5, 0.5, 0.0]
    assert m["first_time"] == [0.5, 0.5, 0.5]
    assert m["iou_previous"] == pytest.approx([3 / 5, 3 / 5, 1 / 3])
    assert m["iou_to_final"] == pytest.approx([1 / 7, 1 / 3, 1.0])
    assert m["survival_next"] == [0.5, 1.0, None]
    assert m["survival_to_end"] == [0.0, 1.0, 1.0]
    assert m["readmitted_share"] == pytest.approx(2 / 6)
    assert m["first_time_share"] == pytest.approx(3 / 6)
    assert m["survival_to_end_share"] == pytest.approx(4 / 6)
    assert m["survival_share"]["1"] == pytest.approx(3 / 4)
    assert m["survival_share"]["2"] == 0.0
    assert m["survival_share"]["5"] is None
    assert m["ever_active_share"] == pytest.approx(7 / 8)


def test_without_the_pruned_set_only_net_changes_are_seen():
    t = MaskTracker()
    t.record(10, {"a": units(0, 1, 2, 3)}, {"a": units(0, 1, 3, 4)})  # unit 3's re-admission is invisible
    m = t.metrics()
    assert m["pruned"] == [1] and m["grown"] == [1] and m["readmitted"] == [0.0]


def test_tracker_state_round_trip_and_bad_records():
    t, _ = hand_built_tracker()
    restored = MaskTracker()
    restored.load_state_dict(t.state_dict())
    assert restored.metrics() == t.metrics()
    with pytest.raises(ConfigError, match="not active"):
        MaskTracker().record(1, {"a": units(0)}, {"a": units(1)}, pruned={"a": units(1)})
    with pytest.raises(ConfigError, match="neither pruned nor grown"):
        MaskTracker().record(1, {"a": units(0, 1)}, {"a": units(1, 2)}, pruned={"a": units(1)})
    assert MaskTracker().metrics() == {"updates": 0}
    assert iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
