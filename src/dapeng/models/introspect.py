"""Looking inside a model: example inputs, a Keras-style summary with FLOPs, and a module-level graph.

Used by `dapeng models show` and `dapeng models graph`; works for any model that follows
the contract (image models expose `cam_layer`; text models `get_input_embeddings`).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapeng.errors import ModelError

DEFAULT_VOCAB = 8000  # used when a text model's vocab_size isn't given (it only sizes the embedding)


def build(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`MODELS.create(name, **kwargs)` with one-line errors for bad arguments."""
    from dapeng.models import MODELS, create_model

    factory = MODELS.get(name)
    given = list(kwargs or {})
    kwargs = dict(kwargs or {})
    params = _constructor_params(factory)
    if "vocab_size" in params and "vocab_size" not in kwargs:
        kwargs["vocab_size"] = DEFAULT_VOCAB
    unknown = sorted(set(kwargs) - set(params)) if params else []
    if unknown:
        raise ModelError(f"model {name!r} has no argument {unknown[0]!r}", f"its arguments: {', '.join(params)}")
    return create_model(name, kwargs, given=given, key="--set ")


def _constructor_params(factory: Any) -> list[str]:
    """Keyword arguments the model accepts (the class's, for the `rnn`/`gru`/`lstm` factories)."""
    target = factory
    if not inspect.isclass(factory):
        # the recurrent factories forward **kwargs to RecurrentClassifier
        from dapeng.models.rnn import RecurrentClassifier

        if factory.__module__ == "dapeng.models.rnn":
            target = RecurrentClassifier
    sig = inspect.signature(target)
    return [n for n, p in sig.parameters.items() if n not in ("self", "kind") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def is_image_model(model: nn.Module) -> bool:
    return hasattr(model, "cam_layer")


def example_inputs(model: nn.Module, seq_len: int = 128, batch: int = 1) -> dict[str, torch.Tensor]:
    """Inputs the model accepts: its own `example_inputs`, images of the size it was built for, or token ids."""
    own = getattr(model, "example_inputs", None)
    if callable(own):
        return own(batch)
    if is_image_model(model):
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        channels = first.in_channels if isinstance(first, nn.Conv2d) else None
        size = getattr(model, "image_size", None)
        if channels is None:  # an MLP: recover the image from the flat width, assuming one channel if square
            width = first.in_features
            side = int(round(width**0.5))
            channels, size = (1, side) if side * side == width else (width, 1)
        return {"images": torch.randn(batch, channels, size or 28, size or 28)}
    vocab = model.get_input_embeddings().num_embeddings
    seq_len = min(seq_len, getattr(model, "max_positions", seq_len))
    ids = torch.randint(0, vocab, (batch, seq_len))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.bool)}
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:
        inputs["decoder_input_ids"] = ids.clone()
    chars = getattr(model, "chars", None)  # a tagger's character CNN: 8 characters a word
    if chars is not None:
        inputs["char_ids"] = torch.randint(1, chars.embedding.num_embeddings, (batch, seq_len, 8))
    return inputs


@dataclass
class Row:
    """One line of the summary."""

    name: str
    kind: str
    depth: int
    output_shape: tuple[int, ...] | None
    params: int


@dataclass
class Summary:
    """A model's layers with output shapes and parameters, and its forward FLOPs."""

    model: str
    rows: list[Row]
    total_params: int
    trainable_params: int
    flops: int
    flops_per: str  # "image", "token" or "document"
    flops_per_unit: float
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "flops_forward": self.flops,
            f"flops_per_{self.flops_per}": self.flops_per_unit,
            "inputs": self.input_shapes,
            "layers": [
                {"name": r.name, "type": r.kind, "output_shape": list(r.output_shape or []), "params": r.params}
                for r in self.rows
            ],
        }

    def render(self) -> str:
        """Keras-style text table."""
        width = max([len(r.name) + 2 * r.depth for r in self.rows] + [20]) + 2
        kind_w = max([len(r.kind) for r in self.rows] + [10]) + 2
        lines = [f'Model: "{self.model}"', "=" * (width + kind_w + 34)]
        lines.append(f"{'Layer':<{width}}{'Type':<{kind_w}}{'Output shape':<22}{'Params':>12}")
        lines.append("-" * (width + kind_w + 34))
        for r in self.rows:
            shape = "(" + ", ".join(map(str, r.output_shape)) + ")" if r.output_shape else "-"
            lines.append(f"{'  ' * r.depth + r.name:<{width}}{r.kind:<{kind_w}}{shape:<22}{r.params:>12,}")
        lines.append("=" * (width + kind_w + 34))
        lines.append(f"Total params: {self.total_params:,}")
        lines.append(f"Trainable params: {self.trainable_params:,}")
        inputs = ", ".join(f"{k} {tuple(v)}" for k, v in self.input_shapes.items())
        lines.append(f"Forward FLOPs: {_human(self.flops)} for {inputs}")
        lines.append(f"FLOPs per {self.flops_per}: {_human(self.flops_per_unit)}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def summarize(model: nn.Module, name: str, depth: int = 3, seq_len: int = 128) -> Summary:
    """Run one example forward pass, recording each module's output shape and counting FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    inputs = example_inputs(model, seq_len=seq_len)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for mod_name, module in model.named_modules():
        if not mod_name or mod_name.count(".") >= depth:
            continue

        def hook(mod: nn.Module, args: Any, out: Any, key: str = mod_name) -> None:
            tensor = out[0] if isinstance(out, tuple) else out
            if key not in shapes and isinstance(tensor, torch.Tensor):
                shapes[key] = tuple(tensor.shape)

        handles.append(module.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    # definition order (named_modules) reads like the model file; shapes come from the call
    names = [n for n in modules if n and n.count(".") < depth]
    rows = [
        Row(n.rsplit(".", 1)[-1] if "." in n else n, type(modules[n]).__name__, n.count("."), shapes.get(n),
            sum(p.numel() for p in modules[n].parameters()))
        for n in names
    ]
    for row, n in zip(rows, names):
        if n.rsplit(".", 1)[-1].isdigit():
            row.name = n.rsplit(".", 2)[-2] + "." + row.name if "." in n else row.name
    flops = counter.get_total_flops()
    if is_image_model(model):
        per, unit = "image", flops / inputs["images"].shape[0]
    elif "input_ids" not in inputs:  # a document model (bag of words): per document
        per, unit = "document", flops / next(iter(inputs.values())).shape[0]
    else:
        per, unit = "token", flops / inputs["input_ids"].numel()
    params = list(model.parameters())
    return Summary(
        model=name,
        rows=rows,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        flops=flops,
        flops_per=per,
        flops_per_unit=unit,
        input_shapes={k: list(v.shape) for k, v in inputs.items()},
    )


def module_graph(model: nn.Module, depth: int = 2, seq_len: int = 16) -> tuple[list[str], list[tuple[str, str]]]:
    """The data flow between modules (cut at `depth`) as (nodes in execution order, edges).

    Traced with `torch.export`, whose nodes remember the module stack that produced them, so
    residual connections and skips show up as real edges; functional glue outside any module
    (mask building, reshapes) is passed through. Models that export can't trace (packed
    sequences) fall back to the chain of their top-level modules in call order.
    """
    model.eval()
    inputs = example_inputs(model, seq_len=seq_len)
    try:
        with warnings.catch_warnings():  # export's notes about RNN weight attributes are not the user's concern
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (), inputs, strict=False)
    except Exception:  # export raises many error types; all mean "can't trace this model"
        return _call_chain(model, inputs)
    nodes: list[str] = []
    edges: list[tuple[str, str]] = []
    sources: dict[str, frozenset[str]] = {}  # graph node -> the module groups its value comes from
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in program.graph_signature.user_inputs:
                group = f"input: {node.name}"
                nodes.append(group)
                sources[node.name] = frozenset([group])
            continue
        incoming = frozenset().union(*(sources.get(a.name, frozenset()) for a in node.all_input_nodes))
        if node.op == "output":
            group = "output"
        else:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            path = stack[-1][0].removeprefix("L['self'].").replace("L['self']", "") if stack else ""
            parts = [p for p in path.split(".") if p][:depth]
            if not parts:
                sources[node.name] = incoming  # top-level glue: pass the provenance through
                continue
            group = ".".join(parts)
        if group not in nodes:
            nodes.append(group)
        sources[node.name] = frozenset([group])
        for src in sorted(incoming):
            if src != group and (src, group) not in edges:
                edges.append((src, group))
    return nodes, edges


def _call_chain(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[str, str]]]:
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda mod, args, key=name: order.append(key))
        for name, module in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    nodes = [f"input: {k}" for k in inputs] + list(dict.fromkeys(order)) + ["output"]
    chain = [n for n in nodes if not n.startswith("input")]
    edges = [(f"input: {k}", chain[0]) for k in inputs] + list(zip(chain, chain[1:]))
    return nodes, edges


def check_image_path(out: Path) -> Path:
    """`out` if it names an .svg or .png file; ModelError otherwise."""
    out = Path(out)
    if out.suffix.lower() not in (".svg", ".png"):
        raise ModelError(f"can't render a graph as {out.suffix or 'no suffix'}", "use --out graph.svg or graph.png")
    return out


def render_graph(nodes: list[str], edges: list[tuple[str, str]], out: Path, title: str) -> Path:
    """Draw the graph top to bottom with matplotlib (SVG or PNG by the file's suffix); atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    out = check_image_path(out)
    y = {n: -i for i, n in enumerate(nodes)}
    width = max(len(n) for n in nodes) * 0.11 + 1.0
    fig, ax = plt.subplots(figsize=(width + 3.0, 0.55 * len(nodes) + 1.0))
    for n in nodes:
        colour = "#dbe9f6" if n.startswith("input") or n == "output" else "#f4f4f4"
        ax.add_patch(FancyBboxPatch((-width / 2, y[n] - 0.3), width, 0.6, boxstyle="round,pad=0.02",
                                    fc=colour, ec="#555555", lw=0.8))
        ax.text(0, y[n], n, ha="center", va="center", fontsize=8, family="monospace")
    for src, dst in edges:
        gap = y[src] - y[dst]
        if gap == 1:  # the next box down: a short straight arrow
            start, end, style = (0, y[src] - 0.3), (0, y[dst] + 0.3), "arc3"
        else:  # skips go down the right side, the rare backward edge up the left
            side = width / 2 if gap > 0 else -width / 2
            start, end = (side, y[src]), (side, y[dst])
            style = f"arc3,rad={-0.35 if gap > 0 else 0.35}"
        ax.annotate("", xy=end, xytext=start,
                    arrowprops={"arrowstyle": "->", "color": "#2b6cb0", "lw": 0.8, "connectionstyle": style})
    ax.set_xlim(-width / 2 - 1.5, width / 2 + 2.5)
    ax.set_ylim(-len(nodes) + 0.3, 0.8)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, bbox_inches="tight", dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


def export_tensorboard(model: nn.Module, log_dir: Path, seq_len: int = 16) -> Path:
    """Write the TorchScript-traced graph to a TensorBoard log directory (`SummaryWriter.add_graph`)."""
    from torch.utils.tensorboard import SummaryWriter

    model.eval()
    inputs = example_inputs(model, seq_len=seq_len)
    with SummaryWriter(str(log_dir)) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's tracer warns about every Python branch on shapes
        writer.add_graph(model, tuple(inputs.values()), use_strict_trace=False)
    return Path(log_dir)
