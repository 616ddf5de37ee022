"""Representation-space analysis from the command line (design §1, issue 4).

    python -m ptpeft_fast.analyze --model M --checkpoints A B ... --data D --out DIR

Runs the pretrained model ``M`` and ``M`` with each PT-PEFT checkpoint (directories written by
``ptpeft_fast.save``) over the same data, hooks the last layer of ``--component``, and writes
to ``DIR``: ``spectrum.png`` (accumulated normalised singular values, one curve per model),
``summary.csv`` and ``summary.md`` (remaining-rank ratio and effective rank per model) and
``curves.csv`` (the curves themselves).

``--data``: a ``.jsonl`` file whose records hold ``input_ids`` (list of ints) or a text field
(``--text-field``, default ``text``), or a ``.txt`` file with one text per line. Text needs a
tokenizer (``--tokenizer``, default: the model directory).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main", "build_parser", "read_samples", "make_batches"]


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m ptpeft_fast.analyze",
        description="Singular-value spectrum of last-layer features: pretrained vs PT-PEFT checkpoints.",
    )
    p.add_argument("--model", required=True,
                   help="a local model folder or a built-in model (smollm2-135m, minilm-l6); nothing is downloaded")
    p.add_argument("--checkpoints", nargs="*", default=[], help="directories written by ptpeft_fast.save")
    p.add_argument("--names", nargs="*", default=None, help="labels for the pretrained model and each checkpoint")
    p.add_argument("--data", required=True, help=".jsonl (input_ids or text per record) or .txt (one text per line)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (or built-in name) for text data "
                                                     "(default: --model)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many samples")
    p.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--component", default="language",
                   help="layer stack to hook: language, vision, ... or a module path")
    p.add_argument("--layer", type=int, default=-1, help="layer index in the stack (default: last)")
    p.add_argument("--threshold", type=float, default=0.9, help="τ of the remaining-rank ratio (default 0.9)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "csrc", "torch"], help="spectrum backend")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def read_samples(path: str | Path, *, tokenizer_name: str | None, text_field: str = "text",
                 max_samples: int | None = None, max_length: int = 512) -> list[list[int]]:
    """Token id lists from a ``.jsonl`` or ``.txt`` file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist")
    records: list[list[int] | str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                if isinstance(rec, dict) and "input_ids" in rec:
                    records.append([int(t) for t in rec["input_ids"]])
                elif isinstance(rec, dict) and isinstance(rec.get(text_field), str):
                    records.append(rec[text_field])
                else:
                    raise ValueError(f"{path}:{lineno}: record has neither 'input_ids' "
                                     f"nor a string {text_field!r} field")
            else:
                records.append(line.rstrip("\n"))
            if max_samples is not None and len(records) >= max_samples:
                break
    if not records:
        raise ValueError(f"--data {path} holds no samples")
    texts = [r for r in records if isinstance(r, str)]
    if texts:
        if tokenizer_name is None:
            raise ValueError("text data needs a tokenizer (--tokenizer)")
        from transformers import AutoTokenizer

        from .models import model_folder

        tok = AutoTokenizer.from_pretrained(model_folder(tokenizer_name), local_files_only=True)
        encoded = iter(tok(texts, add_special_tokens=True)["input_ids"])
        records = [next(encoded) if isinstance(r, str) else r for r in records]
    samples = [list(r)[:max_length] for r in records]
    empty = [i for i, s in enumerate(samples) if not s]
    if empty:
        raise ValueError(f"--data {path}: samples {empty[:5]} have no tokens")
    return samples


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches (similar lengths grouped to save compute)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        L = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _load_model(folder: str, dtype: torch.dtype, device: str):
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except ValueError:  # not a causal LM (encoder, vision-language...): the bare model
        model = transformers.AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def _names(args: argparse.Namespace) -> list[str]:
    default = ["pretrained"] + [Path(c).name or str(c) for c in args.checkpoints]
    names = args.names if args.names else default
    if len(names) != 1 + len(args.checkpoints):
        raise SystemExit(f"--names needs {1 + len(args.checkpoints)} labels (pretrained + each checkpoint), "
                         f"got {len(names)}")
    seen: dict[str, int] = {}
    unique = []
    for n in names:  # two checkpoints named 'final' in different folders must not merge
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return unique


def _write_curves(path: Path, stats: dict) -> None:
    K = max(s.K for s in stats.values())
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["k"] + list(stats))
        for k in range(K):
            w.writerow([k + 1] + [f"{float(s.curve[k]):.8f}" if k < s.K else "" for s in stats.values()])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    import ptpeft_fast
    from ptpeft_fast.analysis import SpectrumAccumulator, compare, extract_features, plot

    for ckpt in args.checkpoints:
        if not (Path(ckpt) / "ptpeft_config.json").is_file():
            raise SystemExit(f"--checkpoints: {ckpt} is not a directory written by ptpeft_fast.save "
                             "(no ptpeft_config.json)")
    names = _names(args)
    from .models import model_folder

    try:  # built-in names and local folders only: nothing of ours reaches for the network
        folder = model_folder(args.model)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SystemExit(f"error: --model: {e}") from None
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    samples = read_samples(args.data, tokenizer_name=args.tokenizer or folder, text_field=args.text_field,
                           max_samples=args.max_samples, max_length=args.max_length)
    stats = {}
    for name, ckpt in zip(names, [None, *args.checkpoints], strict=True):
        model = _load_model(folder, dtype, args.device)
        if ckpt is not None:
            ptpeft_fast.load(model, ckpt)  # patches the fresh model with the saved config, then loads
            model.to(args.device)
        pad_id = getattr(model.config, "pad_token_id", None)
        batches = make_batches(samples, args.batch_size, pad_id if isinstance(pad_id, int) else 0)
        acc = SpectrumAccumulator(args.threshold, backend=args.backend)
        bar = tqdm(total=len(samples), desc=name, unit="sample", disable=args.no_progress, file=sys.stderr)
        for feats, lengths in extract_features(model, batches, component=args.component, layer=args.layer):
            acc.update(feats, lengths)
            bar.update(feats.size(0))
        bar.close()
        stats[name] = acc.compute()
        del model

    table = compare(stats)
    table.to_csv(out / "summary.csv")
    (out / "summary.md").write_text(table.to_markdown(), encoding="utf-8")
    _write_curves(out / "curves.csv", stats)
    plot(stats, out / "spectrum.png", title=f"{Path(args.model).name}: {args.component} layer {args.layer}")
    print(table.to_markdown())
    print(f"wrote {out / 'spectrum.png'}, {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'curves.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
