"""LoRA as a verb over a model: same outputs at start, only LoRA + head trainable, merge is exact."""

import pytest
import torch
from torch import nn

from dapeng.layers.lora import LoRALinear, apply_lora, lora_parameters, merge_lora, trainable_fraction

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))


class Toy(nn.Module):
    def __init__(self, d: int = 16, k: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def test_apply_lora_keeps_outputs_and_trains_only_lora_and_head():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(4, 16)
    before = model(x)
    apply_lora(model, rank=4, alpha=8, targets=("q", "v"))
    assert torch.equal(model(x), before)  # B starts at zero
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.lora_{ab}" for i in (0, 1) for t in "qv" for ab in "ab"} | {
        "head.weight", "head.bias"}
    assert 0 < trainable_fraction(model) < 1
    assert len(lora_parameters(model)) == 8


def test_lora_learns_and_merge_is_exact_with_original_names():
    torch.manual_seed(0)
    model = Toy()
    names = set(model.state_dict())
    apply_lora(model, rank=2, targets=("q", "k", "v"), keep_trainable=())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    frozen = model.blocks[0].q.base.weight.clone()
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.blocks[0].q.base.weight, frozen)
    model.eval()
    adapted = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == names
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_unknown_target_names_the_linear_layers():
    with pytest.raises(ValueError, match="linear layer names"):
        apply_lora(Toy(), targets=("query",))
