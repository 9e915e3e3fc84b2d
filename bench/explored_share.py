"""How much of the network IEE explores with is the explored units? A diagnostic of the ``never_active`` choice.

    regrow train --recipe bench/results/runs/unstructured-resnet8-e22/iee-init-lr0.1-0.95-seed0/recipe.yaml \\
        --max-steps 1350 --out runs/share-init                      # the same with iee-zero-lr0.1-0.95-seed0
    python bench/explored_share.py runs/share-init runs/share-zero --name resnet8-95 --batches 40
    regrow train --model mlp --method iee --sparsity 0.95 --epochs 30 --no-augment --max-steps 1350 \\
        --opt never_active=init --out runs/share-mlp-init               # and never_active=zero
    python bench/explored_share.py runs/share-mlp-init runs/share-mlp-zero --name mlp-95 --batches 40

(``--max-steps`` shortens every schedule to 1350 steps: 6 IEE cycles, the same for both choices.)

IEE's exploration runs the whole network forward: the active units Θ_K and every pruned or never-active unit Θ_P
at the value it holds. For each masked layer this script splits the layer's output on held-out batches into the
part Θ_K computes and the part Θ_P adds (||x * (W ⊙ (1 − M))|| against ||x * (W ⊙ M)||, on the inputs the
exploring network feeds the layer), and compares the accuracy of the exploring network with the sparse one's
(both with BatchNorm on batch statistics, as during training). Where Θ_P's part is large, the gradients the
exploration gives Θ_P, and so the growth that ranks by them, belong to a network far from the sparse one.

A run stopped inside an exploration stage saves its sparse masks (Θ_K), so any checkpoint of a run with masks will do.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from runner import INVOKED_FROM, RESULTS, commit, figure, script_main, style

from regrow import masking
from regrow.artifacts import load_model
from regrow.data import eval_batches, load_dataset
from regrow.errors import RegrowError
from regrow.training import CHECKPOINT, environment


def layer_output(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output for ``x`` under ``weight``, bias left out; a conv through its own ``_conv_forward``, so
    every dimension, padding mode, stride and group count is the module's."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module._conv_forward(x, weight, None)
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight)
    raise RegrowError(f"cannot split the output of a masked {type(module).__name__}")


def checkpoint_of(run: Path) -> Path:
    """A run folder's checkpoint, or the checkpoint file given."""
    return run / CHECKPOINT if run.is_dir() else run


@torch.no_grad()
def measure(run: Path, batches: int, batch_size: int, data_dir: str | None) -> dict:
    path = checkpoint_of(run)
    model, meta = load_model(path)
    layers = masking.masked_layers(model)
    masks = {name: masking.mask_of(m).bool().clone() for name, m in layers.items()}
    total = sum(m.numel() for m in masks.values())
    if not total:
        raise RegrowError(f"{path}: the model has no masked layer")
    masked_sparsity = 1 - sum(int(m.sum()) for m in masks.values()) / total
    if masked_sparsity == 0:
        raise RegrowError(f"{path}: every mask is all ones: no unit to explore")
    data = load_dataset(meta["dataset"], "test", data_dir)
    exploring = copy.deepcopy(model)  # masks opened: the network as IEE's exploration runs it
    for name, module in masking.masked_layers(exploring).items():
        masking.set_mask(module, torch.ones_like(masks[name]))
    squares = {name: [0.0, 0.0] for name in layers}
    modules = dict(exploring.named_modules())

    def hook(name):
        def record(module, inputs, _output):
            weight, mask = masking.raw(module), masks[name].to(masking.raw(module).dtype)
            squares[name][0] += float(layer_output(module, inputs[0], weight * mask).square().sum())
            squares[name][1] += float(layer_output(module, inputs[0], weight * (1 - mask)).square().sum())
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    correct = {"sparse": 0, "exploring": 0}
    seen = 0
    for i, (x, y) in enumerate(eval_batches(data, batch_size)):
        if i == batches:
            break
        for label, net in (("sparse", model), ("exploring", exploring)):
            net.train()  # BatchNorm on the batch's statistics, as in training; the copies are thrown away
            correct[label] += int((net(x).argmax(1) == y).sum())
        seen += len(y)
    for handle in handles:
        handle.remove()
    rows = []
    for name, module in layers.items():
        weight, mask = masking.raw(module), masks[name]
        inactive = weight[~mask].abs()
        rows.append({"layer": name, "density": float(mask.float().mean()),
                     "mean_abs_active": float(weight[mask].abs().mean()),
                     "mean_abs_inactive": float(inactive.mean()) if inactive.numel() else None,
                     "explored_over_active": ((squares[name][1] / squares[name][0]) ** 0.5
                                              if squares[name][0] else None)})
    return {"model": meta["model"], "step": meta.get("step"), "masked_sparsity": masked_sparsity,
            "accuracy_sparse": correct["sparse"] / seen, "accuracy_exploring": correct["exploring"] / seen,
            "samples": seen, "layers": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (their checkpoint.safetensors) or checkpoints")
    p.add_argument("--name", required=True, help="results name: bench/results/explored-share-<name>.{json,md,png}")
    p.add_argument("--batches", type=int, default=20, help="test batches measured")
    p.add_argument("--batch-size", type=int, default=128, help="the training batch size (BatchNorm statistics)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    typed = {str(r): INVOKED_FROM / r for r in args.runs}  # an absolute path stays as it is
    missing = [t for t, r in typed.items() if not checkpoint_of(r).exists()]
    if missing:
        raise RegrowError(f"no checkpoint in {', '.join(missing)}")
    if args.batches <= 0 or args.batch_size <= 0:
        raise RegrowError("--batches and --batch-size must be positive")
    torch.set_num_threads(1)
    results = [{"run": t, **measure(r, args.batches, args.batch_size, args.data_dir)} for t, r in typed.items()]
    command = "python bench/explored_share.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = {"command": command, "commit": commit(), "environment": environment(), "runs": results}
    (RESULTS / f"explored-share-{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# explored-share-{args.name}", "", f"Command: `{command}`  ", f"Written at commit {out['commit']}", "",
             "| run | step | masked sparsity | accuracy, sparse network | accuracy, exploring network |",
             "|---|---|---|---|---|"]
    lines += [f"| {Path(r['run']).name} | {r['step']} | {r['masked_sparsity']:.4f} | "
              f"{100 * r['accuracy_sparse']:.2f} % | {100 * r['accuracy_exploring']:.2f} % |" for r in results]
    lines += ["", "Per masked layer: mean |w| of the active and the inactive units, and the norm of what the inactive "
              "units add to the layer's output over the norm of what the active ones compute.", "",
              "| layer | density | " + " | ".join(f"{Path(r['run']).name}: \\|w\\| active / inactive, Θ_P / Θ_K"
                                                  for r in results) + " |",
              "|---|---|" + "---|" * len(results)]
    for i, layer in enumerate(results[0]["layers"]):
        cells = []
        for r in results:
            x = r["layers"][i]
            inactive = "-" if x["mean_abs_inactive"] is None else f"{x['mean_abs_inactive']:.4f}"
            ratio = "-" if x["explored_over_active"] is None else f"{x['explored_over_active']:.2f}"
            cells.append(f"{x['mean_abs_active']:.4f} / {inactive}, {ratio}")
        lines.append(f"| {layer['layer']} | {layer['density']:.3f} | " + " | ".join(cells) + " |")
    (RESULTS / f"explored-share-{args.name}.md").write_text("\n".join(lines) + "\n")
    with figure(RESULTS / f"explored-share-{args.name}.png", figsize=(9, 4)) as ax:
        for r in results:
            ys = [x["explored_over_active"] or 0.0 for x in r["layers"]]
            ax.plot(range(len(ys)), ys, marker="o", label=Path(r["run"]).name)
        ax.set_xticks(range(len(results[0]["layers"])), [x["layer"] for x in results[0]["layers"]], rotation=45,
                      ha="right", fontsize=7)
        style(ax, "masked layer", "||output of Θ_P|| / ||output of Θ_K||")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main))
