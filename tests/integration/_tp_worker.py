"""One rank of the tensor-parallel check: the example Transformer sharded over the ranks
(`dapeng.train.distributed.tensor_parallel`) against the same model unsharded.

Writes `OUT/rank{R}.json`: the largest differences of the logits and of the weights'
gradients (the shards gathered) from the unsharded model's, with their scales, and how much of the block
weights this rank holds.
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from dapeng.models.transformer import TransformerEncoder  # noqa: E402
from dapeng.train import distributed  # noqa: E402


def main(out: Path) -> int:
    here = distributed.init("tp", "cpu", timeout_s=120)
    torch.manual_seed(0)
    reference = TransformerEncoder(vocab_size=97, num_labels=3, hidden=32, layers=2, heads=4, intermediate=64,
                                   max_positions=16, dropout=0.0)
    model = TransformerEncoder(vocab_size=97, num_labels=3, hidden=32, layers=2, heads=4, intermediate=64,
                               max_positions=16, dropout=0.0)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, 8:] = False  # one padded row: the masked path too

    expected = reference(ids, mask)
    expected.square().sum().backward()
    distributed.tensor_parallel(model, init_device_mesh("cpu", (here.size,)))
    got = model(ids, mask)
    got.square().sum().backward()

    grads = {name: p.grad for name, p in reference.named_parameters()}
    grad_diff = grad_scale = 0.0
    local = total = 0
    for name, p in model.named_parameters():
        full = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grad_diff = max(grad_diff, (full - grads[name]).abs().max().item())
        grad_scale = max(grad_scale, grads[name].abs().max().item())
        if isinstance(p, DTensor):
            local += p.to_local().numel()
            total += p.numel()
    result = {"logits_diff": (got - expected).abs().max().item(), "logits_scale": expected.abs().max().item(),
              "grad_diff": grad_diff, "grad_scale": grad_scale, "sharded_fraction": local / total, "world": here.size}
    (out / f"rank{here.rank}.json").write_text(json.dumps(result))
    distributed.shutdown(0)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
