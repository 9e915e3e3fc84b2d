"""Every bad input, across every subcommand, is one line on stderr and exit status 2, with no traceback, and leaves
every file that was there before exactly as it was. Run in-process (one interpreter for all the cases)."""

import gzip
import shutil
import struct
from pathlib import Path

import pytest
import torch

from regrow import checkpoint
from regrow.cli import main
from regrow.runfolder import LOCK

SMALL = ["--dataset", "synthetic", "--batch-size", "16", "--no-progress", "--device", "cpu"]


def write_idx(path: Path, array: torch.Tensor, truncate: int | None = None, header_only: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    body = b"" if header_only else array.numpy().tobytes()
    data = header + body
    if truncate is not None:
        data = data[:truncate]
    with gzip.open(path, "wb") as f:
        f.write(data)


def data_dir(folder: Path, labels_top: int = 10, n: int = 20, short_header: bool = False,
             truncated_gzip: bool = False) -> Path:
    folder.mkdir()
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = (torch.arange(n) % labels_top).to(torch.uint8)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, truncate=6 if short_header else None)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    if truncated_gzip:
        path = folder / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:100])
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Results and files that bad inputs must leave untouched."""
    w = tmp_path_factory.mktemp("world")
    assert main(["train", *SMALL, "--model", "mlp", "--method", "static", "--max-steps", "2",
                 "--out", str(w / "run")]) == 0
    assert main(["train", *SMALL, "--model", "mlp", "--method", "dense", "--max-steps", "2",
                 "--out", str(w / "dense")]) == 0
    assert main(["train", *SMALL, "--model", "resnet8", "--method", "halp", "--structure", "channel", "--cost", "macs",
                 "--latency-target", "0.6", "--max-steps", "8", "--opt", "prune_every=2", "--opt", "prune_steps=3",
                 "--out", str(w / "chan")]) == 0
    (w / "afile").write_text("not a folder")
    (w / "notes.txt").write_text("hello")
    (w / "badsummary").mkdir()
    (w / "badsummary" / "summary.json").write_text('{"method": "rigl", "layers": 3}')
    (w / "brokenjson").mkdir()
    (w / "brokenjson" / "summary.json").write_text('{"method": ')
    sections, meta = checkpoint.load(w / "run" / "model.safetensors")
    (w / "edited").mkdir()
    checkpoint.save(w / "edited" / "model.safetensors", sections, {**meta, "input_size": 10**7})
    data_dir(w / "labels-out-of-range", labels_top=12)
    data_dir(w / "short-header", short_header=True)
    data_dir(w / "truncated-gzip", truncated_gzip=True)
    data_dir(w / "empty-split", n=0)
    return w


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK}


RUN, DENSE, CHAN = "{w}/run", "{w}/dense", "{w}/chan"
TRAIN = ["train", *SMALL, "--model", "mlp", "--max-steps", "2", "--out", "{o}"]
CASES = [
    # train: options out of range or of the wrong kind
    (TRAIN + ["--sparsity", "1.3"], "sparsity must be in [0, 1)"),
    (TRAIN + ["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (TRAIN + ["--sparsity", "nan"], "sparsity must be in [0, 1)"),
    (TRAIN + ["--sparsity", "abc"], "invalid float value"),
    (TRAIN + ["--model", "resnet21"], "unknown model 'resnet21'"),
    (TRAIN + ["--method", "rigel"], "unknown method 'rigel'"),
    (TRAIN + ["--distribution", "erkk"], "unknown distribution 'erkk'"),
    (TRAIN + ["--structure", "5:4"], "unknown structure '5:4'"),
    (TRAIN + ["--structure", "2:x"], "unknown structure"),
    (TRAIN + ["--structure", "2:4", "--sparsity", "0.9"], "2:4 sparsity is 0.5"),
    (TRAIN + ["--epochs", "0"], "epochs must be a positive integer"),
    (TRAIN + ["--epochs", "-3"], "epochs must be a positive integer"),
    (TRAIN + ["--batch-size", "0"], "batch_size must be a positive integer"),
    (TRAIN + ["--max-steps", "0"], "max_steps must be a positive integer"),
    (TRAIN + ["--threads", "0"], "--threads must be a positive integer"),
    (TRAIN + ["--log-every", "0"], "log_every must be a positive integer"),
    (TRAIN + ["--checkpoint-every", "-1"], "checkpoint_every must be an integer >= 0"),
    (TRAIN + ["--lr", "0"], "lr must be a positive number"),
    (TRAIN + ["--lr", "nan"], "lr must be a positive number"),
    (TRAIN + ["--lr", "inf"], "lr must be a positive number"),
    (TRAIN + ["--momentum", "1.5"], "momentum must be in [0, 1)"),
    (TRAIN + ["--momentum", "nan"], "momentum must be in [0, 1)"),
    (TRAIN + ["--weight-decay", "-1"], "weight_decay must be a number >= 0"),
    (TRAIN + ["--weight-decay", "nan"], "weight_decay must be a number >= 0"),
    (TRAIN + ["--warmup-epochs", "nan"], "warmup_epochs must be a number >= 0"),
    (TRAIN + ["--warmup-epochs", "-1"], "warmup_epochs must be a number >= 0"),
    (TRAIN + ["--label-smoothing", "1"], "label_smoothing must be in [0, 1)"),
    (TRAIN + ["--seed", str(2**63)], "seed must be an integer in [0, 2^63)"),
    (TRAIN + ["--seed", "-1"], "seed must be an integer in [0, 2^63)"),
    (TRAIN + ["--train-subset", "0"], "train_subset must be a positive integer"),
    (TRAIN + ["--train-subset", "100000"], "subset of 100000 samples"),
    (TRAIN + ["--latency-batch", "0"], "latency_batch must be a positive integer"),
    (TRAIN + ["--device", "tpu"], "unknown device 'tpu'"),
    (TRAIN + ["--amp", "fp8"], "invalid choice: 'fp8'"),
    (TRAIN + ["--opt", "nonsense"], "--opt takes key=value"),
    (TRAIN + ["--opt", "sparsity=0.5"], "sparsity is a training option"),
    (TRAIN + ["--opt", "distribution=uniform"], "distribution is a training option"),
    (TRAIN + ["--opt", "seed=3"], "seed is a training option"),
    (TRAIN + ["--opt", "bogus=1"], "takes no option 'bogus'"),
    (TRAIN + ["--method", "rigl", "--opt", "interval=0"], "interval must be a positive number of steps"),
    (TRAIN + ["--method", "rigl", "--opt", "interval=abc"], "interval must be a positive number of steps"),
    (TRAIN + ["--method", "iee", "--opt", "never_active=random"], "unknown never_active 'random'"),
    (TRAIN + ["--method", "iee", "--opt", "never_active_scale=2"], "never_active_scale must be in (0, 1], got 2"),
    (TRAIN + ["--method", "iee", "--opt", "never_active_scale=0.5"], "pass never_active=init too"),
    (TRAIN + ["--method", "iee", "--opt", "never_active_scale=abc"], "never_active_scale must be a number, got 'abc'"),
    (TRAIN + ["--method", "iee", "--opt", "explore_lr_scale=abc"], "explore_lr_scale must be a number, got 'abc'"),
    (TRAIN + ["--method", "rigl", "--opt", "alpha=abc"], "alpha must be a number, got 'abc'"),
    (TRAIN + ["--method", "rigl", "--opt", "alpha=true"], "alpha must be a number, got True"),
    (TRAIN + ["--method", "iee", "--opt", "explore_lr_scale=0"], "explore_lr_scale must be > 0"),
    (TRAIN + ["--method", "dense", "--sparsity", "1.3"], "--method dense trains without masks"),
    (TRAIN + ["--method", "dense", "--opt", "interval=3"], "--method dense trains without masks"),
    (TRAIN + ["--method", "halp"], "halp prunes channels: add --structure channel"),
    (TRAIN + ["--method", "rigl", "--structure", "channel"], "no channel version; channel methods: halp, iee"),
    (TRAIN + ["--method", "halp", "--structure", "channel", "--sparsity", "0.5"], "takes a --latency-target"),
    (TRAIN + ["--method", "halp", "--structure", "channel", "--latency-target", "1.5"], "latency_target"),
    (TRAIN + ["--method", "halp", "--structure", "channel", "--init-from", "{w}/nowhere/model.safetensors"],
     "no checkpoint at"),
    (TRAIN + ["--resume"], "no checkpoint at"),
    (TRAIN + ["--resume", "--overwrite"], "choose one"),
    # train: data that cannot be used
    (["train", "--model", "mlp", "--dataset", "fashion-mnist", "--data-dir", "{w}/nowhere", "--out", "{o}"],
     "Fashion-MNIST not found"),
    (["train", "--model", "mlp", "--data-dir", "{w}/short-header", "--out", "{o}"], "short idx header"),
    (["train", "--model", "mlp", "--data-dir", "{w}/truncated-gzip", "--out", "{o}"], "truncated or damaged"),
    (["train", "--model", "mlp", "--data-dir", "{w}/empty-split", "--out", "{o}"], "is empty"),
    (["train", "--model", "mlp", "--data-dir", "{w}/labels-out-of-range", "--out", "{o}"], "the classes are 0-9"),
    (["train", "--dataset", "imagenet", "--out", "{o}"], "unknown dataset 'imagenet'"),
    # train: where the results would go
    (["train", *SMALL, "--model", "mlp", "--out", "{w}/afile"], "is a file"),
    (["train", *SMALL, "--model", "mlp", "--out", "{w}/afile/sub"], "is a file"),
    (["train", *SMALL, "--model", "mlp", "--method", "static", "--out", RUN], "already holds"),
    (["train", *SMALL, "--model", "mlp", "--method", "static", "--seed", "2", "--out", RUN, "--resume"],
     "configuration differs"),
    # report
    (["report", "{w}/nowhere"], "no summary.json"),
    (["report", "{w}/badsummary"], "is not a regrow run summary"),
    (["report", "{w}/brokenjson"], "is not valid JSON"),
    (["report", RUN, "--plot", "{w}/afile/plot.png"], "is a file"),
    (["report", RUN, "--plot", "{w}"], "is a folder"),
    (["report", RUN, "--mask-plot", "{o}.png"], "has no mask updates"),
    # eval
    (["eval", "{w}/nowhere/model.safetensors"], "no checkpoint at"),
    (["eval", "{w}/notes.txt"], "not a readable safetensors checkpoint"),
    (["eval", RUN + "/model.safetensors", "--model", "resnet20"], "mlp checkpoint, not resnet20"),
    (["eval", "{w}/edited/model.safetensors"], "the file is damaged or was edited"),
    (["eval", RUN + "/model.safetensors", "--dataset", "mnist3"], "unknown dataset 'mnist3'"),
    # export
    (["export", "{w}/nowhere"], "no checkpoint at"),
    (["export", CHAN, "--check-batch", "0", "--format", "onnx"], "--check-batch must be a positive number"),
    (["export", CHAN, "--out", CHAN + "/model.safetensors"], "would replace a run's own file"),
    (["export", CHAN, "--out", CHAN + "/summary.json"], "would replace a run's own file"),
    (["export", CHAN, "--out", "{w}/notes.txt"], "exists; pass --overwrite"),
    (["export", CHAN, "--out", "{w}"], "is a folder"),
    (["export", CHAN, "--out", "{w}/afile/x.safetensors"], "is a file"),
    (["export", "{w}/edited/model.safetensors", "--out", "{o}.safetensors"], "damaged or was edited"),
    (["export", CHAN, "--format", "tflite"], "invalid choice: 'tflite'"),
    # pts
    (["pts", "{w}/nowhere", "--out", "{o}"], "no model at"),
    (["pts", DENSE, "--sparsity", "1.3", "--out", "{o}"], "sparsity must be in [0, 1)"),
    (["pts", DENSE, "--method", "bogus", "--out", "{o}"], "unknown post-training method 'bogus'"),
    (["pts", DENSE, "--threads", "-2", "--out", "{o}"], "--threads must be a positive integer"),
    (["pts", DENSE, "--opt", "lr=-1", "--out", "{o}"], "option lr must be > 0"),
    (["pts", DENSE, "--opt", "mutation_p=abc", "--out", "{o}"], "option mutation_p must be a finite number"),
    (["pts", DENSE, "--opt", "population=2.5", "--out", "{o}"], "option population must be an integer"),
    (["pts", DENSE, "--opt", "momentum=2", "--out", "{o}"], "option momentum must be in [0, 1]"),
    (["pts", DENSE, "--opt", "augment=maybe", "--out", "{o}"], "option augment must be true or false"),
    (["pts", DENSE, "--opt", "wings=2", "--out", "{o}"], "unknown option(s) wings"),
    (["pts", DENSE, "--calibration-size", "0", "--out", "{o}"], "calibration size must be a positive integer"),
    (["pts", DENSE, "--calibration-size", "1000000", "--out", "{o}"], "is larger than the training set"),
    (["pts", DENSE, "--structure", "2:4", "--sparsity", "0.9", "--out", "{o}"], "cannot express 0.9"),
    (["pts", RUN, "--out", "{o}"], "holds a sparse model"),
    (["pts", DENSE, "--out", "{w}/afile"], "is a file"),
    (["pts", DENSE, "--out", "{w}/afile/sub"], "is a file"),
    (["pts", DENSE, "--method", "magnitude", "--out", RUN], "already holds a result"),
    # bench-latency
    (["bench-latency", "{w}/nowhere"], "no checkpoint at"),
    (["bench-latency", CHAN, "--repeats", "0"], "--repeats must be a positive integer"),
    (["bench-latency", CHAN, "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["bench-latency", CHAN, "--threads", "-2"], "--threads must be a positive integer"),
    # the command line itself
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
    (["train", "--epochs"], "expected one argument"),
]


def test_there_are_many_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input(world, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.format(w=world, o=out) for a in argv]
    before = snapshot(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert snapshot(world) == before
    assert not out.exists() or not any(out.iterdir())  # nothing written where the bad run would have gone
    shutil.rmtree(out, ignore_errors=True)
