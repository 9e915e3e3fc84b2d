import pytest
import torch

from regrow.tracking import MaskTracker, iou, pack, unpack


def test_pack_round_trip():
    bits = torch.rand(1001) > 0.5
    assert torch.equal(unpack(pack(bits), 1001), bits)
    assert pack(bits).numel() == 126


def test_iou_and_survival_against_hand_computed_values():
    t = MaskTracker()
    m0 = {"a": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)}
    m1 = {"a": torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)}  # grew index 2
    m2 = {"a": torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool)}  # grew index 3
    m3 = {"a": torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.bool)}  # grew index 4
    t.record(10, m1, m0)
    t.record(20, m2, m1)
    t.record(30, m3, m2)
    assert t.iou_consecutive() == pytest.approx([1 / 3, 1 / 3])
    assert t.iou_to_final() == pytest.approx([0.0, 1 / 3, 1.0])
    assert t.survival(1) == [1.0, 1.0, None]  # index 2 still there at update 2; index 3 at update 3
    assert t.survival(2) == [0.0, None, None]
    assert t.survival_to_end() == [0.0, 1.0, 1.0]
    assert iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    restored = MaskTracker()
    restored.load_state_dict(t.state_dict())
    assert restored.summary() == t.summary()
