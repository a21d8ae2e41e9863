"""Optimizers, schedules and regularizers do what they say, against torch's own references."""

import math

import pytest
import torch
from torch import nn

from dapeng.errors import ConfigError
from dapeng.train.optim import build_optimizer, l1_penalty, lr_factor, no_decay_names, param_groups

torch.set_num_threads(1)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_no_weight_decay_on_norms_and_biases():
    model = tiny()
    assert no_decay_names(model) == {"0.bias", "1.weight", "1.bias", "2.bias"}
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert len(param_groups(model, 0.0)) == 1  # nothing to exempt: one group, one fused kernel


@pytest.mark.parametrize(
    ("name", "kwargs", "reference"),
    [
        ("sgd", {"momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False)),
        ("sgd", {"momentum": 0.9, "nesterov": True},
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=False)),
        ("adam", {}, lambda p: torch.optim.Adam(p, lr=0.05, foreach=False)),
        ("adamw", {"weight_decay": 0.1},
         lambda p: torch.optim.AdamW([{"params": p[:1] + p[3:4], "weight_decay": 0.1},
                                      {"params": p[1:3] + p[4:], "weight_decay": 0.0}], lr=0.05, foreach=False)),
    ],
)
def test_optimizers_match_torch_reference(name, kwargs, reference):
    ours, ref = tiny(), tiny()
    run_steps(ours, build_optimizer(ours, name, lr=0.05, **kwargs))
    # reference param order: 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, 2.bias → regroup like ours
    params = list(ref.parameters())
    ordered = [params[0], params[1], params[2], params[3], params[4], params[5]]
    if name == "adamw":
        ordered = [params[0], params[1], params[2], params[4], params[3], params[5]]
    run_steps(ref, reference(ordered))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer(tiny(), "sgd", nesterov=True)


def test_warmup_then_cosine_values():
    f = lr_factor("cosine", total_steps=110, warmup_steps=10)
    assert [round(f(s), 4) for s in range(3)] == [round(1 / 11, 4), round(2 / 11, 4), round(3 / 11, 4)]
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    floor = lr_factor("cosine", total_steps=100, min_lr_ratio=0.1)
    assert floor(100) == pytest.approx(0.1)


def test_step_linear_constant_values():
    step = lr_factor("step", total_steps=100, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    linear = lr_factor("linear", total_steps=100, warmup_steps=0)
    assert linear(25) == pytest.approx(0.75)
    assert lr_factor("constant", total_steps=10, warmup_steps=4)(2) == pytest.approx(3 / 5)
    assert lr_factor("constant", total_steps=10)(7) == 1.0
    with pytest.raises(ConfigError, match="not one of constant, step, cosine, linear"):
        lr_factor("exp", total_steps=10)


def test_schedule_drives_the_optimizer_lr():
    from dapeng.train.optim import build_schedule

    model = tiny()
    opt = build_optimizer(model, "sgd", lr=1.0)
    sched = build_schedule(opt, "cosine", total_steps=4, warmup_steps=0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


def test_l1_drives_irrelevant_weights_to_zero():
    """A sparse regression: y depends on 2 of 20 features. L1 zeroes the other 18, plain MSE doesn't."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=gen)
    true = torch.zeros(20)
    true[:2] = torch.tensor([2.0, -3.0])
    y = x @ true + 0.5 * torch.randn(256, generator=gen)

    def fit(l1: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(20, 1)
        opt = build_optimizer(model, "sgd", lr=0.05)
        for _ in range(200):
            loss = (model(x).squeeze(-1) - y).pow(2).mean()
            if l1:
                loss = loss + l1_penalty([model.weight], l1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return model.weight.detach().squeeze(0)

    plain, sparse = fit(0.0), fit(0.2)
    assert sparse[2:].abs().max() < 0.02  # subgradient steps hover within about lr·l1 = 0.01 of zero
    assert plain[2:].abs().max() > 0.05
    assert sparse[:2].abs().min() > 1.5  # the real signal survives
    assert l1_penalty([torch.tensor([1.0, -2.0])], 0.5).item() == pytest.approx(1.5)
