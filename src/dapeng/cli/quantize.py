"""`dapeng quantize RUN --method int8-dynamic|int8-weight-only|int8-static|int8-groupwise [--calibration N] [--backend torch|onnxruntime] [--max-drop 0.5] --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXAMPLE = """example:
  dapeng quantize runs/rt-minilm --method int8-dynamic --out runs/rt-minilm/model-int8
  dapeng quantize runs/fm --method int8-static --calibration 256 --max-drop 1.0
  dapeng predict runs/rt-minilm/model-int8 "a gripping, funny film"     # an Artifact like any other
  dapeng quantize runs/rt-minilm --backend onnxruntime                  # ONNX Runtime's int8 of the ONNX export
  dapeng serve runs/rt-minilm/onnx-int8-dynamic                          # served by ONNX Runtime

The accuracy on the run's eval split is measured before and after; a model that loses more
than --max-drop points is not written (exit 2, both figures on one line). With --backend
onnxruntime the run's ONNX export (RUN/export-onnx, written first when missing) is quantized by
ONNX Runtime (int8-dynamic, or int8-static calibrated on --calibration training samples) into an
export folder that `dapeng.load`, predict and serve run with ONNX Runtime."""

METHODS = ("int8-dynamic", "int8-weight-only", "int8-static", "int8-groupwise")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="int8-quantize a run's model, refusing one that loses more than --max-drop points",
        description="Post-training int8 quantization of RUN/model into an Artifact (safetensors + the "
        "quantization spec in dapeng.json) that load, predict and serve use unchanged.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="run directory written by `dapeng train`")
    p.add_argument("--method", choices=METHODS, default="int8-dynamic", help="default int8-dynamic")
    p.add_argument("--calibration", type=int, default=256, help="training samples that calibrate int8-static (256)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="torch: int8 PyTorch layers in an Artifact (default); onnxruntime: ONNX Runtime's "
                        "quantizer over the run's ONNX export")
    p.add_argument("--max-drop", type=float, default=0.5, help="largest accuracy drop allowed, in points (0.5)")
    p.add_argument("--split", choices=("eval", "test"), default="eval", help="split the gate measures (default eval)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: RUN/model-METHOD, or RUN/onnx-METHOD with --backend onnxruntime)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from dapeng.cli._runs import encoded, load_run
    from dapeng.compress.quantize import quantize_artifact
    from dapeng.errors import ConfigError

    if args.calibration < 1:
        raise ConfigError(f"--calibration {args.calibration} is not a positive number of samples", "use e.g. 256")
    loaded = load_run(args.run)
    calibration = encoded(loaded, "train", args.calibration) if args.method == "int8-static" else []
    if args.backend == "onnxruntime":
        result = _quantize_onnx(args, loaded, calibration)
    else:
        out = args.out or args.run / f"model-{args.method}"
        result = quantize_artifact(loaded.artifact, args.method, encoded(loaded, args.split), out,
                                   calibration=calibration, max_drop=args.max_drop)
    if args.json:
        print(json.dumps(result))
        return 0
    size = result["size_mb"]
    layers = f"; {result['layers']} layers quantized" if "layers" in result else ""
    print(f"{args.method} ({args.backend}): {args.split} accuracy {result['before']:.4f} → {result['after']:.4f} "
          f"(drop {result['drop']:.2f} points, max {args.max_drop}); weights {size['before']:.2f} MB → "
          f"{size['after']:.2f} MB{layers}; model: {result['model']}")
    return 0


def _quantize_onnx(args: argparse.Namespace, loaded: Any, calibration: list[Any]) -> dict[str, Any]:
    """ONNX Runtime's int8 over the run's ONNX export (made first, checked on real inputs, when missing)."""
    from dapeng.cli._runs import encoded
    from dapeng.compress.export import export
    from dapeng.compress.runtime import ORT_METHODS, find_export, quantize_export
    from dapeng.errors import ConfigError

    if args.method not in ORT_METHODS:
        raise ConfigError(f"--backend onnxruntime has no {args.method}", f"choose --method {' or '.join(ORT_METHODS)}")
    source = find_export(args.run)
    if source is None:
        source = args.run / "export-onnx"
        export(loaded.artifact.model, loaded.artifact.task, encoded(loaded, "eval", limit=37), source, "onnx",
               artifact_dir=loaded.artifact.path)
    out = args.out or args.run / f"onnx-{args.method}"
    return quantize_export(source, args.method, encoded(loaded, args.split), out,
                           calibration=calibration, max_drop=args.max_drop)
