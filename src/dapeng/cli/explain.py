"""`dapeng explain RUN INPUT --out report.html|png`: why did the model predict that?"""

from __future__ import annotations

import argparse
import json

METHODS = ("ig", "saliency", "gradcam", "attention", "rollout")

EXAMPLE = """examples:
  dapeng explain runs/rt-cnn "a gorgeous, witty, seductive movie" --out report.html
  dapeng explain runs/fmnist shoe.png --method gradcam --out cam.png
  dapeng explain runs/rt-transformer "flat and dull" --method attention --out attention.png
  dapeng explain runs/rt-cnn "flat and dull" --target fresh --json
  dapeng explain runs/vqa --image shape.png "what color is the shape?" --method gradcam --out vqa.html

methods: ig (Integrated Gradients, text and images), saliency, gradcam (images),
attention (every layer and head of a Transformer), rollout (attention rollout); an image+text
model (visual question answering) takes --image FILE and the question, and gradcam gives one page:
Grad-CAM over the image and Integrated Gradients over the question's words, for the same answer.
.html gives a self-contained page (words shaded by attribution); .png a heatmap."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain",
        help="explain a prediction: attribution heatmaps and attention maps",
        description="Explain what a trained model's prediction rests on.\n\n" + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run directory, an Artifact folder or a hub name")
    p.add_argument("input", metavar="INPUT", help="the text to explain, or an image file")
    p.add_argument("--image", default=None, help="image+text models: the image the INPUT question is about")
    p.add_argument("--method", choices=METHODS, default="ig", help="attribution method (default: ig)")
    p.add_argument("--target", default=None, help="the label to explain (default: the predicted one)")
    p.add_argument("--out", default=None, help="write the rendered explanation here (.html or .png)")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("--memory-budget-mb", type=float, default=2048, help="memory for attributions (default 2048)")
    p.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps to start with (default 50)")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dapeng.errors import DapengError
    from dapeng.explain import explain
    from dapeng.explain.render import headline
    from dapeng.pipeline import load

    if args.out is not None and Path(args.out).suffix.lower() not in (".html", ".htm", ".png"):
        raise DapengError(f"cannot render to {args.out!r}", "use a .html or .png file name")
    pipeline = load(args.run, precision="fp32")
    target: str | int | None = args.target
    if (pipeline.input_field == "image+text") != (args.image is not None):
        raise DapengError("--image goes with image+text models, and they need it",
                          f"model {args.run!r} reads {pipeline.input_field} inputs")
    given = {"image": args.image, "text": args.input} if args.image is not None else args.input
    [explanation] = explain(
        pipeline, given, method=args.method, target=target, memory_budget_mb=args.memory_budget_mb,
        n_steps=args.steps,
    )
    written = explanation.save(args.out) if args.out else None
    if args.json:
        out = explanation.to_dict()
        out["out"] = str(written) if written else None
        print(json.dumps(out))
    else:
        print(headline(explanation) + (f" → {written}" if written else ""))
    return 0
