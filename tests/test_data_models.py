import gzip
import struct
from pathlib import Path

import pytest
import torch

from regrow import masking
from regrow.data import (
    DEFAULT_FASHION_MNIST_DIR,
    augment,
    fashion_mnist_dir,
    get_batch,
    load_fashion_mnist,
    read_idx,
    subset_indices,
    synthetic,
)
from regrow.errors import ConfigError, DataError
from regrow.models import MODELS, create_model


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(array.flatten().tolist()))


def fake_fashion_mnist(folder, n=20):
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_idx_files_are_read_and_normalised(tmp_path):
    images, labels = fake_fashion_mnist(tmp_path)
    assert torch.equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    data = load_fashion_mnist("test", tmp_path)
    assert data.images.shape == (20, 1, 28, 28) and torch.equal(data.labels, labels.long())
    assert data.images[0, 0, 0, 0].item() == pytest.approx((images[0, 0, 0].item() / 255 - 0.2860) / 0.3530, abs=1e-5)


def test_data_dir_from_environment_and_missing_folder(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path)
    monkeypatch.setenv("REGROW_DATA_DIR", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir(tmp_path / "nowhere")


def test_truncated_idx_is_a_data_error(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR).exists(), reason="Fashion-MNIST package not installed")
def test_real_fashion_mnist_has_the_expected_splits():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert abs(train.images.mean().item()) < 0.05 and abs(train.images.std().item() - 1) < 0.05


def test_subsets_are_deterministic_distinct_and_balanced():
    labels = torch.arange(1000) % 10
    a = subset_indices(labels, 100, seed=3, balanced=True)
    assert torch.equal(a, subset_indices(labels, 100, seed=3, balanced=True))
    assert not torch.equal(a, subset_indices(labels, 100, seed=4, balanced=True))
    assert a.unique().numel() == 100
    assert torch.equal(torch.bincount(labels[a]), torch.full((10,), 10))
    assert subset_indices(labels, 37, seed=0).unique().numel() == 37
    for bad in (0, -5, 1001):
        with pytest.raises(DataError):
            subset_indices(labels, bad)


def test_batches_are_a_function_of_seed_epoch_and_index():
    data = synthetic(100, size=12)
    x1, y1 = get_batch(data, 16, seed=0, epoch=2, index=3)
    x2, y2 = get_batch(data, 16, seed=0, epoch=2, index=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = get_batch(data, 16, seed=0, epoch=3, index=3)
    assert not torch.equal(x1, x3)
    assert get_batch(data, 16, 0, 0, 6)[0].shape[0] == 4  # the last, partial batch


def test_augment_shifts_and_flips_within_padding():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment(x, torch.Generator().manual_seed(0), pad=1, pad_value=-1.0)
    assert out.shape == x.shape
    # every output is a shifted (and maybe flipped) copy: its 2×2 centre comes from the original grid
    centre = out[:, 0, 1:3, 1:3]
    assert ((centre >= 0) & (centre <= 15)).all()
    assert len({tuple(o.flatten().tolist()) for o in out}) > 4


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_registry_model_runs(name, channels):
    model = create_model(name, in_channels=channels, num_classes=7)
    model.eval()
    assert model(torch.randn(2, channels, 28, 28)).shape == (2, 7)


def test_model_sizes_and_depthwise_convs():
    n_params = sum(p.numel() for p in create_model("resnet20").parameters())
    assert 260_000 < n_params < 280_000  # ResNet-20 is about 0.27 M parameters
    wrn = create_model("wrn22-2", in_channels=3)
    assert 1_050_000 < sum(p.numel() for p in wrn.parameters()) < 1_120_000  # WRN-22-2 is about 1.1 M
    assert len(masking.prunable_layers(wrn)) == 1 + 3 * 3 * 2 + 3 + 1  # stem, 9 blocks × 2, 3 shortcuts, fc
    mobilenet = create_model("mobilenetv2")
    assert any(m.groups == m.in_channels > 1 for m in mobilenet.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ConfigError, match="unknown model 'resnet21'; known: mlp, mobilenetv2"):
        create_model("resnet21")
