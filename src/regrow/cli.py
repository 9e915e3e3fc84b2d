"""Command line: ``regrow train | pts | eval | report | export | bench-latency | demo | methods``.

Every error of the regrow family is printed as one line on stderr (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .allocation import DISTRIBUTIONS
from .env import resolve_device
from .errors import ConfigError, DataError, RegrowError
from .methods import method_options, names
from .models import MODELS

THREADS_HELP = ("CPU threads for this run (default: torch's, one per core). Use 1 when other jobs share the cores: "
                "with both cores of a 2-core machine busy, a training on two threads was measured 2 to 40 times "
                "slower than on one")


class Milliseconds(float):
    """A latency budget given as a time (``--latency-target 12ms``)."""


def latency_budget(value: str | float) -> float:
    """``--latency-target``: a fraction of the dense model's cost (``0.3``) or a time in milliseconds (``12ms``,
    returned as :class:`Milliseconds`); the range is checked with the rest of the configuration."""
    text = str(value).strip().lower()
    try:
        return Milliseconds(text[:-2]) if text.endswith("ms") else float(text)
    except ValueError:  # argparse shows this text; a recipe's check names the option
        raise argparse.ArgumentTypeError(f"{value!r} is neither a fraction such as 0.3 nor a time such as 12ms"
                                         ) from None


latency_budget.description = "a fraction such as 0.3 or a time such as 12ms"  # what a recipe's error says


def _parse_option(text: str | tuple[str, Any]) -> tuple[str, Any]:
    if isinstance(text, tuple):  # from a recipe: already typed
        return text
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--opt takes key=value, got {text!r}")
    low = raw.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model with a sparsification method",
                       description="Train with a sparsification method and write DIR/summary.json, "
                                   "DIR/metrics.jsonl, DIR/model.safetensors and a resumable checkpoint.",
                       epilog=lambda: "Method options (--opt key=value; a float in (0, 1] for a step option is a "
                                      "fraction of training, an int is a step count):\n" + _methods_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, metavar="YAML", help="read the options from a recipe file (every "
                   "run writes its own as DIR/recipe.yaml); flags given here win over it")
    p.add_argument("--model", default="resnet20", help=f"one of {', '.join(MODELS)} (default resnet20), or "
                   "package.module:factory, a function of yours that returns an nn.Module")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), synthetic, or "
                   "package.module:factory, a function of yours that returns (train, test)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files "
                   "(default $REGROW_DATA_DIR, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--method", default="rigl", help="a method of 'regrow methods' (default rigl): one of regrow's, "
                   "one registered with regrow.register or the regrow.methods entry points, or package.module:Class")
    p.add_argument("--sparsity", type=float, default=None, help="target fraction of zeros in [0, 1) (default 0.9; "
                   "with --structure N:M, 1 - N/M)")
    p.add_argument("--distribution", default=None, help=f"one of {', '.join(DISTRIBUTIONS)} (default erk)")
    p.add_argument("--structure", default="unstructured",
                   help="unstructured (default), N:M such as 2:4, or channel (methods halp and iee)")
    p.add_argument("--latency-target", type=latency_budget, default=0.5,
                   help="channel structure: the budget as a fraction of the dense model's cost (default 0.5), or "
                        "as a time such as 12ms at --latency-batch on this device (the dense model's forward is "
                        "timed once, at the start, to turn it into that fraction)")
    p.add_argument("--cost", default="latency", choices=["latency", "macs"],
                   help="channel structure: latency measured on this device (default) or MACs")
    p.add_argument("--latency-batch", type=int, default=64, help="batch size of the latency table (default 64)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from a dense model.safetensors (HALP's pretrained model; its cost is reported)")
    p.add_argument("--dense-first", action="store_true", help="keep the first layer dense")
    p.add_argument("--dense-last", action="store_true", help="keep the last layer dense")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedules use it)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the cosine schedule")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--no-nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random crop and flip")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout: faster convolutions on CPU (default on; --no-channels-last for NCHW)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when available)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16: forward under bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (see the README)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP + "; with --nproc, split between them")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (default 1): each "
                   "trains on its slice of every batch (--batch-size is the global batch), masks stay identical "
                   "across processes; Gloo on the CPU, one GPU each with --device cuda. Under torchrun, leave it "
                   "at 1: the processes torchrun starts join one group")
    p.add_argument("--train-subset", type=int, default=None, help="train on a seeded subset of N samples")
    p.add_argument("--synthetic-size", type=int, default=512, help="samples per split of --dataset synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--log-every", type=int, default=50, help="steps between metric lines")
    p.add_argument("--eval-every", type=int, default=1,
                   help="epochs between test evaluations (default 1; the last epoch is always evaluated)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: every epoch)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def _methods_text() -> str:
    from .methods import Dense, lookup
    from .training import TRAINER_OPTIONS

    hidden = TRAINER_OPTIONS | {"include", "exclude", "cost_model"}  # set by the trainer, or Python-only
    lines = []
    entries = [(n, lookup(n)) for n in names()] + [(f"{n} --structure channel", lookup(n, "channel"))
                                                   for n in names("channel")]
    for name, cls in entries:
        if cls is Dense:
            lines.append(f"  {name}: no options")
            continue
        own = {k: v for k, v in method_options(cls).items() if k not in hidden}
        lines.append(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in own.items()) or "no options"))
    return "\n".join(lines)


def _config_from(args) -> Any:
    from .training import TrainConfig

    if args.method == "dense" or args.structure == "channel":
        what = "--method dense trains without masks" if args.method == "dense" else \
            "--structure channel takes a --latency-target"
        given = [flag for flag, value in (("--sparsity", args.sparsity), ("--distribution", args.distribution),
                                          ("--opt", (args.opt or None) if args.method == "dense" else None))
                 if value is not None]
        if given:
            raise ConfigError(f"{what}; {', '.join(given)} would be recorded without effect")
    sparsity = args.sparsity
    if sparsity is None:  # N:M fixes the sparsity (2:4 is 0.5); otherwise 0.9
        from .structures import NM, get_structure

        structure = get_structure(args.structure) if ":" in (args.structure or "") else None
        sparsity = 1 - structure.density if isinstance(structure, NM) else 0.9
    return TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, method=args.method,
        sparsity=sparsity,
        distribution=args.distribution or "erk", structure=args.structure,
        method_options=dict(map(_parse_option, args.opt)),
        dense_first=args.dense_first, dense_last=args.dense_last, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        augment=not args.no_augment, channels_last=args.channels_last, device=args.device, amp=args.amp,
        compile=args.compile,
        train_subset=args.train_subset, synthetic_size=args.synthetic_size,
        latency_target=0.5 if isinstance(args.latency_target, Milliseconds) else args.latency_target,
        latency_target_ms=float(args.latency_target) if isinstance(args.latency_target, Milliseconds) else None,
        cost=args.cost, latency_batch=args.latency_batch,
        init_from=args.init_from,
        seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)


def _set_threads(args) -> None:
    """--threads: torch's intra-op threads for the whole command (a process of --nproc gets its share)."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def cmd_train(args) -> int:
    from . import distributed
    from .training import build_trainer, resolve_latency_ms, train_parallel

    _set_threads(args)
    if not isinstance(args.nproc, int) or args.nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer, got {args.nproc}")
    config, converted = resolve_latency_ms(_config_from(args), args.out)  # once, before any process starts
    if converted is not None:
        print(f"regrow: {config.latency_target_ms:g} ms at batch {config.latency_batch} is {converted['fraction']:.4f} "
              f"of the dense model's {converted['dense_ms']:.3g} ms "
              + ("measured now" if converted["measured"] else "measured when this run started"), file=sys.stderr)
    if distributed.init_from_environment(config.device):  # started by torchrun: this process is one rank
        if args.nproc != 1:
            raise ConfigError("--nproc starts its own processes; under torchrun leave it out")
        summary = build_trainer(config, args.out).run(resume=args.resume, overwrite=args.overwrite)
        if summary is None:  # not rank 0: rank 0 reports
            return 0
    else:
        summary = train_parallel(config, args.out, args.nproc, resume=args.resume, overwrite=args.overwrite)
    print(f"{summary['method']} {summary['model']}: test accuracy {summary['test_accuracy']:.4f}, sparsity "
          f"{summary['sparsity_actual']:.4f}, training FLOPs {summary['train_flops_ratio']:.3f}× dense, "
          f"{summary['wall_seconds']:.1f} s -> {Path(args.out) / 'summary.json'}")
    return 0


def cmd_report(args) -> int:
    from .report import format_report, plot_densities, plot_mask_metrics, read_summary
    from .runfolder import check_writable

    summary = read_summary(args.run)
    if args.mask_plot and not (summary.get("mask_metrics") or {}).get("updates"):
        raise ConfigError(f"{args.run} has no mask updates to plot ({summary['method']} never changed its mask)")
    for plot in (args.plot, args.mask_plot):
        if plot is not None:
            if Path(plot).is_dir():
                raise ConfigError(f"plot path {plot} is a folder; give the PNG file to write")
            check_writable(Path(plot).parent)
    try:
        text = json.dumps(summary, indent=2) if args.json else format_report(summary)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{args.run}'s summary.json has a field regrow cannot read ({type(e).__name__}: {e})") \
            from None
    print(text)
    if args.plot:
        plot_densities(summary, args.plot)
        print(f"per-layer density plot -> {args.plot}")
    if args.mask_plot:
        plot_mask_metrics({summary["method"]: summary}, args.mask_plot)
        print(f"mask metrics plot -> {args.mask_plot}")
    return 0


def cmd_eval(args) -> int:
    from .artifacts import check_data_fits, load_model
    from .data import load_dataset
    from .training import evaluate

    model, meta = load_model(args.checkpoint, expect_model=args.model)
    data = load_dataset(args.dataset or meta["dataset"], "test", args.data_dir)
    check_data_fits(meta, data, str(args.checkpoint))
    accuracy, loss = evaluate(model, data)
    from . import masking

    weights = masking.weight_sparsity(model)  # as the run summaries count it: every weight matrix
    sparsity = weights["sparsity"]
    layers = masking.masked_layers(model)
    total = sum(m.weight_mask.numel() for m in layers.values())
    masked = 1 - sum(float(m.weight_mask.sum()) for m in layers.values()) / total if total else 0.0
    result = {"checkpoint": str(args.checkpoint), "model": meta["model"], "test_accuracy": accuracy,
              "test_loss": loss, "sparsity": sparsity, "sparsity_masked": masked, "left_dense": weights["left_dense"]}
    print(json.dumps(result) if args.json else
          f"{meta['model']}: test accuracy {accuracy:.4f}, loss {loss:.4f}, sparsity {sparsity:.4f}")
    return 0


def _load_run_model(run: str):
    from .artifacts import MODEL, load_model

    path = Path(run)
    path = path / MODEL if path.is_dir() else path
    return load_model(path)


def cmd_export(args) -> int:

    from .artifacts import MODEL_KEYS, RESULT_FILES, example_inputs, trace_inputs
    from .export import count_parameters, export_masked_model, export_onnx, save_exported
    from .runfolder import RunFolder, check_writable

    if args.check_batch <= 0:
        raise ConfigError(f"--check-batch must be a positive number of samples, got {args.check_batch}")
    source = Path(args.run)
    folder = source if source.is_dir() else source.parent
    out = Path(args.out or folder / ("exported.onnx" if args.format == "onnx" else "exported.safetensors"))
    if out.name in RESULT_FILES or (source.exists() and out.exists() and out.resolve() == source.resolve()):
        raise ConfigError(f"--out {out} would replace a run's own file; choose another name")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the file to write")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    check_writable(out.parent)
    model, meta = _load_run_model(args.run)
    before = count_parameters(model)
    model.eval()
    exported, structure = export_masked_model(model, trace_inputs(meta))
    with RunFolder(out.parent):
        if args.format == "onnx":
            written = export_onnx(exported, example_inputs(meta, args.check_batch, seed=0), out)
            detail = f"{written.exporter} exporter, onnxruntime matches PyTorch within {written.max_abs_diff:.2g}"
        else:
            save_exported(out, exported, structure, {k: meta[k] for k in MODEL_KEYS if k in meta})
            detail = "load with regrow.export.load_exported"
    print(f"exported {meta['model']}: {before:,} -> {count_parameters(exported):,} parameters -> {out} ({detail})")
    return 0


def cmd_bench_latency(args) -> int:
    from .latency_report import format_latency_report, latency_report

    for flag, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats), ("--passes", args.passes),
                        ("--threads", args.threads)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if args.deploy is not None:
        try:
            sizes = [int(b) for b in args.deploy.split(",") if b]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) <= 0:
            raise ConfigError(f"--deploy takes batch sizes separated by commas, such as 1,64,256; got {args.deploy!r}")
    device = resolve_device(args.device)
    if args.deploy is not None and device.type != "cpu" and not args.no_onnx:
        raise ConfigError(f"--deploy on {device}: ONNX Runtime is timed on its CPU provider only; add --no-onnx to "
                          "time PyTorch alone there")
    model, meta = _load_run_model(args.run)
    if args.deploy is not None:
        from .latency_report import deployment_latency, format_deployment_latency

        result = deployment_latency(model, meta, batch_sizes=sizes, repeats=args.repeats, threads=args.threads,
                                    onnx=not args.no_onnx, device=device)
        print(json.dumps(result, indent=2) if args.json else format_deployment_latency(result))
        return 0
    result = latency_report(model, meta, batch_size=args.batch_size, repeats=args.repeats, threads=args.threads,
                            passes=args.passes, device=device)
    asked = _time_budget(args.run)
    if asked is not None and asked["latency_batch"] == args.batch_size:
        measured = result["exported"]["measured_ms"]
        result["budget"] = {"asked_ms": asked["latency_target_ms"], "measured_ms": measured,
                            "met": measured <= asked["latency_target_ms"]}
    print(json.dumps(result, indent=2) if args.json else format_latency_report(result))
    if "budget" in result and not args.json:
        b = result["budget"]
        print(f"budget: {b['asked_ms']:g} ms asked for at batch {args.batch_size}, exported {b['measured_ms']:.3g} ms "
              + ("(met)" if b["met"] else f"(over by {100 * (b['measured_ms'] / b['asked_ms'] - 1):.1f} %)"))
    return 0


def _time_budget(run: str) -> dict | None:
    """The budget a run was asked for as a time (``--latency-target 12ms``), from its summary; None otherwise."""
    from .artifacts import SUMMARY

    path = Path(run)
    summary = (path if path.is_dir() else path.parent) / SUMMARY
    if not summary.is_file():
        return None
    try:
        config = json.loads(summary.read_text()).get("config", {})
    except (OSError, ValueError):
        return None
    return config if config.get("latency_target_ms") is not None else None


def cmd_demo(args) -> int:
    from .report import format_report
    from .training import TrainConfig, build_trainer

    _set_threads(args)
    out = Path(args.out)
    config = TrainConfig(model="resnet20", method="rigl", sparsity=0.9, distribution="erk", epochs=1,
                         max_steps=args.max_steps, data_dir=args.data_dir, seed=0, progress=not args.no_progress)
    print("regrow demo: RigL, ResNet-20 on Fashion-MNIST, 90 % sparsity (ERK), one epoch")
    summary = build_trainer(config, out).run(resume=(out / "checkpoint.safetensors").exists())
    print(format_report(summary))
    return 0


def cmd_pts(args) -> int:
    from .posttraining import PTSConfig, run_pts

    _set_threads(args)
    sparsity = args.sparsity if args.sparsity is not None else (None if ":" in args.structure else 0.9)
    config = PTSConfig(method=args.method, sparsity=sparsity, structure=args.structure,
                       calibration_size=args.calibration_size, balanced=not args.unbalanced, seed=args.seed,
                       dataset=args.dataset, data_dir=args.data_dir, options=dict(map(_parse_option, args.opt)),
                       expect_model=args.model, progress=not args.no_progress, exclude=tuple(args.exclude))
    s = run_pts(config, args.checkpoint, args.out, overwrite=args.overwrite)
    searched = s.get("search")
    detail = (f"; searched distribution: calibration {searched['calibration_accuracy']:.4f}, held-out "
              f"{searched['heldout_accuracy']:.4f}") if searched else ""
    print(f"{s['method']} {s['model']}: test accuracy {s['test_accuracy']:.4f} "
          f"(dense {s['dense_test_accuracy']:.4f}), sparsity {s['sparsity_actual']:.4f}, {s['wall_seconds']:.1f} s"
          f"{detail} -> {Path(args.out) / 'summary.json'}")
    return 0


def _pts_text() -> str:
    from .posttraining import pts_names, resolve_pts

    entries = [(name, resolve_pts(name).defaults) for name in pts_names()]
    return "\n".join(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in opts.items()) or "no options")
                     for name, opts in entries)


def _pts_parser(sub) -> None:
    p = sub.add_parser("pts", help="post-training sparsity of a dense model from a small calibration set",
                       description="Sparsify a dense trained model (regrow train --method dense) with a small "
                                   "calibration set of the training split; write DIR/model.safetensors and "
                                   "DIR/summary.json (the fields of regrow train, plus the per-layer sparsities).",
                       epilog=lambda: "Method options (--opt key=value):\n" + _pts_text() + "\nUniPTS ablations: "
                                      "distribution=uniform, mask=static, tau=constant, loss=mse; the overfitting "
                                      "check: distribution=unconstrained.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a dense model.safetensors, or the --out folder of regrow train, or a plain "
                   "safetensors state dict (with --model and --dataset)")
    p.add_argument("--method", default="unipts", help="one of unipts, pot, wanda, magnitude (default unipts), or "
                   "package.module:Class (a regrow.posttraining.PostTrainingMethod)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="target fraction of zeros in [0, 1) (default 0.9; N:M implies its own)")
    p.add_argument("--structure", default="unstructured", help="unstructured (default) or N:M such as 2:4")
    p.add_argument("--calibration-size", type=int, default=1024,
                   help="training samples to calibrate on (default 1024; class-balanced, seeded)")
    p.add_argument("--unbalanced", action="store_true", help="draw the calibration set without class balance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="fail unless the checkpoint is of this architecture; for a plain "
                   "state dict: its architecture (a registry name or package.module:factory)")
    p.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="LAYER", help="layers to leave dense (listed in "
                   "the summary), such as an attention's out_proj, which POT and Wanda cannot calibrate")
    p.add_argument("--out", default="runs/pts", help="output folder (default runs/pts)")
    p.add_argument("--overwrite", action="store_true", help="replace a result already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def cmd_methods(args) -> int:
    print(_methods_text())
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit status 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        if callable(self.epilog):  # built when help is printed: it imports every installed method
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="regrow", description="Sparse training and pruning for PyTorch")
    parser.add_argument("--version", action="version", version=f"regrow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.train_parser = _train_parser(sub)
    r = sub.add_parser("report", help="per-layer table, parameters, MACs and sparsity of a finished run")
    r.add_argument("run", help="the --out folder of 'regrow train'")
    r.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    r.add_argument("--plot", default=None, metavar="PNG", help="also write a per-layer density plot")
    r.add_argument("--mask-plot", default=None, metavar="PNG",
                   help="also plot the mask metrics per update (IoU, re-admission, survival)")
    e = sub.add_parser("eval", help="re-evaluate a saved model (model.safetensors or checkpoint.safetensors)")
    e.add_argument("checkpoint")
    e.add_argument("--model", default=None, help="fail unless the checkpoint is of this architecture")
    e.add_argument("--dataset", default=None, help="default: the dataset it was trained on")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--json", action="store_true")
    d = sub.add_parser("demo", help="a short sparse training on Fashion-MNIST that ends with a report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--max-steps", type=int, default=None, help="shorten the demo")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    sub.add_parser("methods", help="list the methods and their options")
    _pts_parser(sub)
    x = sub.add_parser("export", help="remove masked channels physically; save as a plain model or ONNX")
    x.add_argument("run", help="a run folder (its model.safetensors) or a model.safetensors")
    x.add_argument("--format", choices=["torch", "onnx"], default="torch")
    x.add_argument("--out", default=None, help="default RUN/exported.safetensors or RUN/exported.onnx")
    x.add_argument("--check-batch", type=int, default=8, help="ONNX: batch the onnxruntime check runs on")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    b = sub.add_parser("bench-latency", help="params, MACs, predicted and measured latency: dense vs exported")
    b.add_argument("run", help="a run folder (its model.safetensors) or a model.safetensors")
    b.add_argument("--batch-size", type=int, default=64, help="batch size of every latency figure (default 64)")
    b.add_argument("--repeats", type=int, default=50, help="timed runs per model after warm-up (default 50)")
    b.add_argument("--passes", type=int, default=3, help="passes of dense/exported timing; the speed-up is the median "
                   "of the within-pass ratios (default 3)")
    b.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's)")
    b.add_argument("--deploy", default=None, metavar="BATCHES", help="instead: dense against exported at these batch "
                   "sizes (such as 1,64,256) under PyTorch and ONNX Runtime")
    b.add_argument("--no-onnx", action="store_true", help="with --deploy: PyTorch only")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where the latency table is "
                   "measured and the two models are timed")
    b.add_argument("--json", action="store_true")
    return parser


def _one_line(message: str) -> str:
    return " ".join(message.split())


COMMANDS = {"train": cmd_train, "report": cmd_report, "eval": cmd_eval, "demo": cmd_demo, "methods": cmd_methods,
            "export": cmd_export, "bench-latency": cmd_bench_latency, "pts": cmd_pts}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        if getattr(args, "recipe", None):  # the recipe's options become defaults; the flags given win over them
            from .recipe import read_recipe

            parser.train_parser.set_defaults(**read_recipe(args.recipe, parser.train_parser))
            args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except RegrowError as e:
        print(f"regrow: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system refusal the checks could not foresee (disk full, a vanished folder)
        where = f" ({e.filename})" if e.filename else ""
        print(f"regrow: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regrow: interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
