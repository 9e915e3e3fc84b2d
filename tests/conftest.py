import pytest
import torch
from torch import nn

# Tiny models gain nothing from threads, and a second busy process on the machine makes them spin.
torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Conv (plain, grouped, depthwise) + BN + Linear: every masked layer type, small enough for 100-step tests."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.depthwise(self.grouped(x)))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_step(model, optimizer, t):
    """One optimizer step on the deterministic batch number ``t``."""
    x, y = batch(t)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def train_on(model, optimizer, sparsifier, batches):
    """One optimizer step, then one sparsifier step, per ``(x, y)`` of ``batches`` (cross-entropy)."""
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.step()


def train_steps(model, optimizer, sparsifier, steps, seed=0):
    train_on(model, optimizer, sparsifier, (batch(seed + t) for t in range(steps)))


class CountingMeasure:
    """A latency "measurement" for a LatencyTable that counts its calls (a cell costs its MACs, roughly)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, shape, c_in, c_out, batch_size, device, repeats):
        self.calls += 1
        return 1e-3 * c_in * c_out * (shape.in_size[0] if shape.in_size else 1) + 0.01
