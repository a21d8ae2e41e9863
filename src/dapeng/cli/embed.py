"""`dapeng embed MODEL TEXT... [--file F] [--out X.npy] [--json]`: sentence embeddings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLE = """example:
  dapeng embed minilm-l6 "a gripping film" "a thrilling movie" --json    # vectors as JSON
  dapeng embed minilm-l6 --file reviews.txt --out reviews.npy           # one text per line -> (n, 384) array
  python -c 'import dapeng; print(dapeng.load("minilm-l6").embed(["hi"]).shape)'"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed",
        help="sentence embeddings from an encoder (search, clustering)",
        description="Embed texts with the model's own pooling (MiniLM: mean over tokens, L2-normalised). "
        "Cosine similarity of two texts is the dot product of their vectors.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub name (minilm-l6), Artifact folder or run directory")
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--file", type=Path, help="a text file, one text per line ('-' for stdin)")
    p.add_argument("--out", type=Path, help="write the (n, dim) float32 array to this .npy file")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    p.add_argument("--json", action="store_true", help="print {\"shape\", \"embeddings\"} as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.errors import DataError

    texts = list(args.texts)
    if args.file is not None:
        try:
            lines = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        except OSError as err:
            raise DataError(f"can't read {args.file}: {err.strerror}", "check the path") from None
        texts += [line for line in lines.splitlines() if line.strip()]
    if not texts:
        raise DataError("no texts to embed", "pass texts as arguments or --file")
    import numpy as np

    from dapeng.pipeline import load

    pipe = load(args.model, precision=args.precision)
    vectors = pipe.embed(texts)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, vectors)
        tmp.replace(args.out)
    if args.json:
        print(json.dumps({"shape": list(vectors.shape), "embeddings": vectors.round(6).tolist()}))
    elif args.out is None:
        for text, vec in zip(texts, vectors):
            print(f"{text[:40]!r:44s} [{', '.join(f'{v:.4f}' for v in vec[:6])}, …] ({len(vec)} dims)")
    else:
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.out}")
    return 0
