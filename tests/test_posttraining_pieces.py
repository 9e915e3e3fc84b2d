import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regrow import masking
from regrow import posttraining as pts
from regrow.data import synthetic
from regrow.errors import ConfigError, DataError


def test_calibration_set_is_seeded_distinct_balanced_and_checked():
    train = synthetic(200, seed=1)
    a, b = pts.calibration_set(train, 40, seed=3), pts.calibration_set(train, 40, seed=3)
    assert torch.equal(a.images, b.images) and len(a) == 40
    c = pts.calibration_set(train, 40, seed=4)
    assert not torch.equal(a.images, c.images)
    assert torch.unique(a.images.flatten(1), dim=0).shape[0] == 40  # no duplicates
    counts = torch.bincount(a.labels, minlength=train.num_classes)
    assert counts.max() - counts.min() <= 1
    for bad in (0, -5, 201):
        with pytest.raises(DataError, match="calibration size"):
            pts.calibration_set(train, bad)


def test_batchnorm_recalibration_estimates_the_calibration_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(5.0)
    images = torch.randn(64, 1, 8, 8)
    pts.recalibrate_batchnorm(model, images, batch_size=16)
    with torch.no_grad():
        out = model[0](images)
    assert torch.allclose(model[1].running_mean, out.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([out[i:i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 64, 16)]).mean(0)
    assert torch.allclose(model[1].running_var, per_batch_var, atol=1e-5)
    assert model[1].momentum == 0.1 and model.training  # momentum and mode restored


def test_wanda_mask_equals_a_hand_computed_one_for_linear_and_conv():
    torch.manual_seed(0)
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.1, 4.0, -0.2, 1.0]]))
    x = torch.tensor([[1.0, 0.0, 0.0, 4.0], [1.0, 0.0, 1.0, 3.0]])  # ‖X_j‖ = (√2, 0, 1, 5)
    masks = pts.wanda_masks(linear, {"l": linear}, x, sparsity=0.5)
    # row 0 scores: 1.41, 0, 3, 2.5 -> keep inputs 2, 3; row 1: 0.14, 0, 0.2, 5 -> keep 2, 3
    assert masks["l"].tolist() == [[False, False, True, True], [False, False, True, True]]

    conv = nn.Conv2d(2, 3, 2, padding=1, bias=False)
    images = torch.randn(5, 2, 4, 4)
    got = pts.wanda_masks(conv, {"c": conv}, images, sparsity=0.75)["c"]
    padded = F.pad(images, (1, 1, 1, 1))
    norms = torch.zeros(2, 2, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):  # the input entry that weight [., c, i, j] multiplies, at every output position
                patch = padded[:, c, i:i + 5, j:j + 5]
                norms[c, i, j] = patch.pow(2).sum().sqrt()
    scores = conv.weight.detach().abs() * norms
    expected = torch.zeros_like(scores, dtype=torch.bool)
    for o in range(3):
        top = torch.topk(scores[o].flatten(), 2).indices
        expected[o].view(-1)[top] = True
    assert torch.equal(got, expected)


def test_wanda_handles_depthwise_convs_per_channel():
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
    images = torch.randn(4, 3, 5, 5)
    images[:, 1] *= 10  # channel 1's inputs are large: its norms scale, the others' do not
    norms = pts.input_norms(conv, pts.input_square_sums(conv, {"c": conv}, images)["c"])
    assert norms.shape == conv.weight.shape
    assert norms[1].mean() > 5 * norms[0].mean() and norms[1].mean() > 5 * norms[2].mean()


def test_wanda_running_norms_equal_norms_over_every_kept_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    layers = {"0": model[0], "3": model[3]}
    images = torch.randn(600, 2, 5, 5)  # three calibration batches of 256, 256 and 88
    running = pts.input_square_sums(model, layers, images)
    kept = pts.layer_inputs(model, layers, images)
    for name, m in layers.items():
        assert len(kept[name]) == 3
        columns = torch.cat([pts.input_columns(m, x) for x in kept[name]])
        torch.testing.assert_close(running[name], columns.pow(2).sum(0))


def assert_least_squares_fit(columns, target, row_mask, row_weight, bias):
    """One output row (kept weights + bias) fits ``target`` as well as a direct least-squares solve does."""
    support = torch.nonzero(row_mask.flatten()).flatten()
    design = torch.cat([columns[:, support], torch.ones(columns.shape[0], 1)], 1).double()
    target = target.double()
    best = torch.linalg.lstsq(design, target[:, None]).solution.flatten()
    ours = torch.cat([row_weight.flatten()[support], bias.reshape(1)]).detach().double()
    assert (design @ ours - target).pow(2).mean() <= 1.05 * (design @ best - target).pow(2).mean() + 1e-8


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_pot_refit_lowers_the_layers_output_error_on_calibration_data(kind):
    torch.manual_seed(0)
    layer = nn.Linear(20, 8) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    # Inputs with few underlying factors (as real activations are): the kept weights can stand in for pruned ones.
    if kind == "linear":
        x = torch.randn(64, 5) @ torch.randn(5, 20) + 0.01 * torch.randn(64, 20)
    else:
        x = torch.einsum("bkhw,kc->bchw", torch.randn(16, 2, 6, 6), torch.randn(2, 4)) + 0.01 * torch.randn(16, 4, 6, 6)
    with torch.no_grad():
        dense_out = layer(x)
    mask = pts.magnitude_masks({"l": layer}, {"l": 0.7})["l"]
    with torch.no_grad():
        masked = F.linear(x, layer.weight * mask, layer.bias) if kind == "linear" else \
            F.conv2d(x, layer.weight * mask, layer.bias, padding=1)
    before = F.mse_loss(masked, dense_out)
    pts.pot_refit(layer, mask, [x])
    with torch.no_grad():
        layer.weight.mul_(mask)
        after = F.mse_loss(layer(x), dense_out)
    assert after < (0.2 if kind == "linear" else 0.8) * before
    assert (layer.weight[~mask] == 0).all()
    # Output row 0 fits as well as the least-squares solution on its kept inputs (+ bias), as a direct solve finds it.
    columns = x if kind == "linear" else F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36)
    target = dense_out[:, 0] if kind == "linear" else dense_out[:, 0].reshape(-1)
    assert_least_squares_fit(columns, target, mask[0], layer.weight[0], layer.bias[0])


@pytest.mark.parametrize("groups, c_out", [(4, 4), (2, 6)], ids=["depthwise", "grouped"])
def test_pot_refits_grouped_convs_row_by_row_on_their_groups_inputs(groups, c_out):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, c_out, 3, padding=1, groups=groups)
    x = F.interpolate(torch.randn(8, 4, 4, 4), size=(8, 8), mode="bilinear")  # smooth: neighbours stand in
    with torch.no_grad():
        dense_out = conv(x)
    mask = pts.magnitude_masks({"c": conv}, {"c": 0.6})["c"]
    with torch.no_grad():
        before = F.mse_loss(F.conv2d(x, conv.weight * mask, conv.bias, padding=1, groups=groups), dense_out)
    pts.pot_refit(conv, mask, [x])
    with torch.no_grad():
        after = F.mse_loss(conv(x), dense_out)
    assert (conv.weight[~mask] == 0).all()
    assert after < 0.7 * before
    # every row equals the least-squares fit on its own group's kept inputs (+ bias)
    per_group, rows_per_group = 4 // groups, c_out // groups
    for row in range(c_out):
        g = row // rows_per_group
        columns = F.unfold(x[:, g * per_group:(g + 1) * per_group], 3, padding=1).transpose(1, 2)
        columns = columns.reshape(-1, per_group * 9)
        assert_least_squares_fit(columns, dense_out[:, row].reshape(-1), mask[row], conv.weight[row], conv.bias[row])


def test_base_decayed_kl_matches_a_hand_computed_value_and_tau_decays():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    T, tau = 4.0, 3.0
    total = 0.0
    for b in range(2):
        zt = [v / T for v in teacher[b].tolist()]
        pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        zs = student[b].tolist()
        log_norm = math.log(sum(math.exp(u) for u in zs))
        total += sum(p * (math.log(p) - (s - log_norm) / tau) for p, s in zip(pt, zs))
    expected = T * T * total / 2
    assert pts.base_decayed_kl(student, teacher, tau, T).item() == pytest.approx(expected, rel=1e-6)
    assert pts.tau_at(0.0) == 8.0
    for epoch in (1, 37, 99):
        assert pts.tau_at(epoch / 100) == pytest.approx(8 * 0.99 ** epoch)


def test_regrow_sparsities_meet_the_target_and_cap_every_layer():
    sizes = [100, 2000, 5000, 50]
    for seed in range(5):
        genes = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        s, achieved = pts.regrow_sparsities(genes, sizes, 0.9)
        assert all(0 <= v <= 0.95 + 1e-12 for v in s)
        total = sum(v * n for v, n in zip(s, sizes)) / sum(sizes)
        assert achieved == pytest.approx(total)
        if min(s) > 0:  # no clipping: exactly the target
            assert achieved == pytest.approx(0.9)
        else:  # a small layer clipped at 0: slightly above, and reported
            assert achieved > 0.9
    s, achieved = pts.regrow_sparsities(torch.tensor([0.0, 0.0, 0.0, 8.0]), sizes, 0.9)
    assert s[3] == 0.0 and achieved > 0.9  # the small layer would go negative: clipped


def test_sparsity_search_is_seeded_and_improves_its_fitness():
    sizes = [300, 600, 1200, 100]
    calls = []

    def fitness(sparsities):  # prefers sparsifying the big layer: a known optimum to move towards
        calls.append(1)
        return -abs(sparsities[2] - 0.95) - 0.1 * abs(sparsities[0] - 0.85)

    def search(seed):
        calls.clear()
        s = pts.SparsitySearch(sizes, 0.9, fitness, population=8, generations=6, parents=4, children=4,
                               mutants=3, seed=seed)
        return s.run(), s.history, len(calls)

    (best, achieved, score), history, n_calls = search(1)
    again = search(1)
    assert (best, achieved, score) == again[0] and history == again[1]
    assert n_calls <= 8 * 6
    assert history[-1]["best_fitness"] >= history[0]["best_fitness"]
    assert all(v <= 0.95 + 1e-12 for v in best) and achieved >= 0.9 - 1e-12


def test_dynamic_sparse_training_keeps_exact_sparsity_and_gives_dense_gradient_plus_srste():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    dst = pts.DynamicSparsity(model, sparsities={"0": 0.5, "2": 0.8}, srste=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first, last = masking.raw(model[0]), masking.raw(model[2])
    changed = False
    for _ in range(5):
        x = torch.randn(8, 6)
        masks = dst.masks()
        out = model(x)
        loss = out.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        # Hand-computed: dL/dW_eff for the last layer (its input is the hidden activation), then SR-STE.
        mask = masks["2"]
        with torch.no_grad():
            hidden = torch.relu(x @ (first * masks["0"]).T + model[0].bias)
            expected = 2 * out.T @ hidden + 0.01 * (~mask) * last
        assert torch.allclose(last.grad, expected, atol=1e-5)
        assert (last.grad[~mask] != 0).any()  # pruned weights do receive gradient
        optimizer.step()
        dst.step()
        for name, s in (("0", 0.5), ("2", 0.8)):
            assert int(dst.masks()[name].sum()) == round((1 - s) * masking.raw(model[int(name)]).numel())
        # the masks follow the weights: the top |w| of the weights the step just made
        assert torch.equal(dst.masks()["2"], pts.select_mask(last.detach().abs(), 0.8))
        changed |= not torch.equal(dst.masks()["2"], mask)
    assert changed  # a pruned weight came back (or an active one left) along the way
    assert isinstance(first, nn.Parameter) and "0.weight" in model.state_dict()
    dst.finalize()
    assert not masking.is_masked(model[0]) and not masking.is_masked(model[2])


def test_static_dynamic_sparsity_gives_pruned_weights_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    dst = pts.DynamicSparsity(model, sparsities={"0": 0.5, "2": 0.5}, static=True)
    start = dst.masks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        model(torch.randn(8, 6)).pow(2).sum().backward()
        assert (masking.raw(model[2]).grad[~start["2"]] == 0).all()
        optimizer.step()
        optimizer.zero_grad()
        dst.step()
    assert all(torch.equal(dst.masks()[n], start[n]) for n in start)


class TokenModel(nn.Module):
    """Token ids in, a tensor out: what a user's own (Hugging Face) model wrapped for sparsify_model looks like."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.embed(ids)))).mean(1)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "pot"])
def test_sparsify_model_in_memory_on_token_inputs(method):
    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.randint(0, 50, (40, 12))
    masks = pts.sparsify_model(model, ids, method=method, sparsity=0.75)
    assert set(masks) == {"mix", "out"} and set(masking.masked_layers(model)) == {"mix", "out"}
    for name, mask in masks.items():
        assert mask.float().mean() == pytest.approx(0.25, abs=0.01), name
        assert torch.equal(masking.mask_of(getattr(model, name)), mask)
    masks = pts.sparsify_model(TokenModel(), ids, method="wanda", sparsity=None, structure="2:4")
    assert all(m.reshape(-1, 4).sum(1).eq(2).all() for m in masks.values())


QUICK_UNIPTS = {"epochs": 20, "batch_size": 16, "population": 4, "generations": 2, "parents": 2, "children": 2,
                "mutants": 1, "teacher_mode": "eval"}


@pytest.mark.parametrize("fitness, loss", [("cosine", "cosine"), ("agreement", "kl")])
def test_unipts_in_memory_without_labels_searches_and_trains_against_the_dense_model(fitness, loss):
    """UniPTS on a model and unlabelled token ids: the search scores candidates against the dense model's outputs
    (cosine for an encoder, top-1 agreement for a classifier) and the sparse training moves the weights towards
    them; the masks hold the target, and the dense model the inputs came with is the teacher, unchanged."""
    torch.manual_seed(0)
    model = TokenModel()
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 50, (48, 12))
    details = {}
    masks = pts.sparsify_model(model, ids, method="unipts", sparsity=0.7, details=details,
                               options={**QUICK_UNIPTS, "fitness": fitness, "loss": loss})
    kept = sum(int(m.sum()) for m in masks.values())
    assert 1 - kept / sum(m.numel() for m in masks.values()) == pytest.approx(0.7, abs=0.02)
    assert details["search"]["fitness"] == fitness and details["search"]["heldout_accuracy"] is None
    assert len(details["search"]["history"]) == 2 and 0 < details["search"]["calibration_accuracy"] <= 1
    training = details["training"]
    assert training["steps"] == 20 * 3 and training["folder"] is None and len(training["loss_per_epoch"]) == 20
    assert details["flops"] > 0 and details["stages"]["sparse_training"] > 0
    assert torch.equal(masking.mask_of(model.mix), masks["mix"])  # the masks are on the model
    if loss != "cosine":
        return  # the base-decayed KL matches the student at T = 1 to the teacher at T = 4: not a cosine to compare
    # trained towards the teacher: closer to the dense outputs than the same masks on the dense weights
    untrained = copy.deepcopy(dense)
    with torch.no_grad():
        for name, mask in masks.items():
            getattr(untrained, name).weight.mul_(mask)
        model.eval()
        closeness = [float(F.cosine_similarity(m(ids), dense(ids)).mean()) for m in (untrained, model)]
    assert closeness[1] > closeness[0], closeness


def test_sparsify_model_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="no labels: pass the option fitness=agreement"):
        pts.sparsify_model(TokenModel(), torch.randint(0, 50, (8, 4)), method="unipts", sparsity=0.5)
    with pytest.raises(ConfigError, match="unknown"):
        pts.sparsify_model(TokenModel(), torch.randint(0, 50, (8, 4)), method="wandaa", sparsity=0.5)
