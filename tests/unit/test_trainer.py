"""The Trainer: learning, events, early stop, accumulation, clipping, precision, in-process exact resume."""

import pytest
import torch
from _trainer_toy import ToyNet, ToyTask, make_records

from dapeng.errors import CheckpointError, ConfigError
from dapeng.train.precision import autocast, bf16_supported, resolve_device, resolve_precision
from dapeng.train.trainer import StopTraining, Trainer, monitor_mode

torch.set_num_threads(1)


def setup(n: int = 96, dropout: float = 0.1, seed: int = 0):
    records = make_records(n)
    task = ToyTask()
    task.setup(records)
    torch.manual_seed(seed)
    model = ToyNet(**task.model_kwargs(), dropout=dropout)
    return task, model, task.encode(records[: n * 3 // 4]), task.encode(records[n * 3 // 4 :])


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda trainer, **info: self.events.append(name)


def crash_and_resume(task, train, eval, folder, kwargs, crash_step: int = 7) -> Trainer:
    """Train until a simulated crash at `crash_step`, then resume a freshly initialised model from `folder`."""

    class Crash:
        def on_step_end(self, trainer):
            if trainer.state.step == crash_step:
                raise RuntimeError("simulated crash")

    _, model, _, _ = setup()
    with pytest.raises(RuntimeError, match="simulated"):
        Trainer(model, task, checkpoint_dir=folder, callbacks=[Crash()], **kwargs).fit(train, eval)
    _, fresh, _, _ = setup(seed=123)  # different init: everything must come from the checkpoint
    trainer = Trainer(fresh, task, checkpoint_dir=folder, **kwargs)
    trainer.fit(train, eval, resume=True)
    return trainer


def test_fit_learns_and_reports():
    task, model, train, eval = setup()
    trainer = Trainer(model, task, epochs=4, batch_size=8, lr=0.01, precision="fp32", monitor="eval/accuracy")
    summary = trainer.fit(train, eval)
    assert summary["steps"] == 4 * 9
    assert summary["best"] >= 0.9
    assert trainer.evaluate(eval)["eval/accuracy"] >= 0.9
    assert len(trainer.predict(eval)) == len(eval)


def test_events_fire_in_order():
    task, model, train, eval = setup(n=32)
    rec = Recorder()
    Trainer(model, task, epochs=2, batch_size=8, log_every=3, precision="fp32", callbacks=[rec]).fit(train, eval)
    ev = rec.events
    assert ev[0] == "on_fit_start" and ev[-1] == "on_fit_end"
    assert ev.count("on_epoch_start") == 2 and ev.count("on_epoch_end") == 2
    assert ev.count("on_step_end") == 6 and ev.count("on_eval_end") == 2
    assert ev.index("on_eval_end") < ev.index("on_epoch_end")


def test_log_every_controls_how_often_loss_is_read():
    task, model, train, _ = setup(n=64)
    class L:
        def on_log(self, trainer, logs):
            calls.append(trainer.state.step)

    calls: list[int] = []
    Trainer(model, task, epochs=1, batch_size=4, log_every=4, precision="fp32", callbacks=[L()]).fit(train)
    assert calls == [4, 8, 12]


def test_callback_can_stop_training():
    task, model, train, _ = setup()

    class StopAt:
        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                raise StopTraining("enough")

    trainer = Trainer(model, task, epochs=5, batch_size=8, precision="fp32", callbacks=[StopAt()])
    summary = trainer.fit(train)
    assert summary["steps"] == 3 and summary["stopped"] == "enough"


def test_early_stopping_and_best_weights():
    task, model, train, eval = setup()
    # lr=0 never improves after the first evaluation → stops after 1 + patience evaluations
    trainer = Trainer(model, task, epochs=10, batch_size=8, lr=1e-12, early_stopping=2, precision="fp32")
    summary = trainer.fit(train, eval)
    assert summary["epochs"] == 3 and "no improvement" in summary["stopped"]
    assert summary["best_step"] == 9


def test_max_steps_and_unknown_monitor():
    task, model, train, eval = setup()
    assert Trainer(model, task, epochs=9, max_steps=5, batch_size=8, precision="fp32").fit(train)["steps"] == 5
    with pytest.raises(ConfigError, match="eval/f1.*eval/accuracy"):
        Trainer(model, task, batch_size=8, monitor="eval/f1", precision="fp32").fit(train, eval)


def test_gradient_accumulation_matches_a_big_batch():
    """2 micro-batches of 8 with accumulation = 1 batch of 16, for a mean loss and no dropout."""
    task, model_a, train, _ = setup(n=64, dropout=0.0)
    _, model_b, _, _ = setup(n=64, dropout=0.0)
    Trainer(model_a, task, epochs=1, batch_size=16, optimizer="sgd", lr=0.1, precision="fp32").fit(train)
    Trainer(model_b, task, epochs=1, batch_size=8, grad_accum=2, optimizer="sgd", lr=0.1, precision="fp32").fit(train)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_averages_a_short_last_group_over_its_own_size():
    """48 items in micro-batches of 8 with grad_accum=4: groups of 4 and 2 = batches of 32 and 16."""
    task, model_a, train, _ = setup(n=64, dropout=0.0)
    _, model_b, _, _ = setup(n=64, dropout=0.0)
    assert len(train) == 48
    Trainer(model_a, task, epochs=1, batch_size=32, optimizer="sgd", lr=0.1, precision="fp32").fit(train)
    Trainer(model_b, task, epochs=1, batch_size=8, grad_accum=4, optimizer="sgd", lr=0.1, precision="fp32").fit(train)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_update():
    task, model, train, _ = setup(n=8, dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model, task, epochs=1, batch_size=8, optimizer="sgd", lr=1.0, grad_clip=1e-3, precision="fp32").fit(train)
    change = torch.cat([(p.detach().cpu() - b.cpu()).flatten() for p, b in zip(model.parameters(), before)])
    assert change.norm().item() == pytest.approx(1e-3, rel=1e-3)  # one SGD step of lr·(clipped grad)


def test_precision_selection():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_supported(cpu) else "fp32")
    with pytest.raises(ConfigError, match="not one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    layer = torch.nn.Linear(4, 4)
    with autocast("bf16", cpu):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("fp32", cpu):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_bf16_training_runs_and_learns():
    task, model, train, eval = setup()
    trainer = Trainer(model, task, epochs=3, batch_size=8, lr=0.01, precision="bf16", monitor="eval/accuracy")
    assert trainer.precision == "bf16"
    assert trainer.fit(train, eval)["best"] >= 0.8
    assert next(model.parameters()).dtype == torch.float32  # autocast keeps fp32 master weights


def test_monitor_mode():
    assert monitor_mode("eval/loss") == "min"
    assert monitor_mode("eval/accuracy") == "max"
    assert monitor_mode("eval/accuracy", "min") == "min"


def test_in_process_resume_is_bit_identical(tmp_path):
    """Train 2 epochs straight vs. stop mid-epoch at step 7 (checkpoint every 3 → resume from 6)."""
    kwargs = dict(epochs=2, batch_size=8, lr=0.01, precision="fp32", deterministic=True, checkpoint_every=3)
    task, straight, train, eval = setup()
    Trainer(straight, task, checkpoint_dir=tmp_path / "a", **kwargs).fit(train, eval)

    trainer = crash_and_resume(task, train, eval, tmp_path / "b", kwargs)
    assert trainer.state.step == 18
    for a, b in zip(straight.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_fails(tmp_path):
    task, model, train, _ = setup()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(model, task, checkpoint_dir=tmp_path, precision="fp32").fit(train, resume=True)


def test_compile_option_trains(monkeypatch):
    """`compile=True` runs the model through torch.compile (the cheap eager backend here: inductor's
    C++ build takes minutes on CI's 2 cores) and keeps clean state-dict names."""
    calls = []
    real = torch.compile

    def eager_compile(model, **kwargs):
        calls.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    task, model, train, _ = setup(n=16)
    summary = Trainer(model, task, epochs=1, batch_size=8, precision="fp32", compile=True).fit(train)
    assert summary["steps"] == 2 and calls == [model]
    assert "_orig_mod" not in "".join(model.state_dict())


@pytest.mark.gpu
def test_cuda_auto_device_and_bf16():
    task, model, train, eval = setup()
    trainer = Trainer(model, task, epochs=2, batch_size=8, lr=0.01, device="auto", precision="auto",
                      monitor="eval/accuracy")
    assert trainer.device.type == "cuda"
    assert trainer.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert trainer.fit(train, eval)["best"] >= 0.8
    assert next(model.parameters()).is_cuda


def test_weight_average_follows_the_weights_with_a_ramped_decay():
    from dapeng.train.ema import WeightAverage

    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1)
    frozen.requires_grad_(False)
    average = WeightAverage(torch.nn.Sequential(model, frozen), decay=0.9)
    assert sorted(average.average) == [0, 1]  # the frozen layer is left out while frozen
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()  # decay min(0.9, 2/11)
    expected = start + (1 - 2 / 11)
    assert torch.allclose(average.average[0], expected)
    with average.applied():
        assert torch.equal(model.weight, average.average[0])
    assert torch.equal(model.weight, start + 1.0)  # the trained weights come back
    frozen.requires_grad_(True)  # gradual unfreezing: averaged from its first trained step on
    average.update()
    assert sorted(average.average) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_ema_is_evaluated_kept_and_resumed(tmp_path):
    kwargs = dict(epochs=2, batch_size=8, lr=0.05, precision="fp32", deterministic=True, checkpoint_every=3,
                  ema=0.9, monitor="eval/accuracy")
    task, straight, train, eval = setup()
    trainer = Trainer(straight, task, checkpoint_dir=tmp_path / "a", **kwargs)
    summary = trainer.fit(train, eval)
    # after fit the model holds the average, not the last trained weights
    average = trainer.weight_average.average
    assert len(average) == len(list(straight.parameters()))
    assert all(torch.equal(p, average[i]) for i, p in enumerate(straight.parameters()))
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert not torch.equal(last["model"]["head.weight"], straight.head.weight)
    assert last["ema"]["updates"] == summary["steps"]
    # the best checkpoint holds the weights that were evaluated: the average at that step
    trainer.load_best()
    assert trainer.evaluate(eval)["eval/accuracy"] == summary["best"]

    again = crash_and_resume(task, train, eval, tmp_path / "b", kwargs)
    resumed = again.model
    for i, a in trainer.weight_average.average.items():
        assert torch.equal(a, again.weight_average.average[i])
    Trainer(resumed, task, checkpoint_dir=tmp_path / "c", **{**kwargs, "ema": None, "epochs": 1}).fit(train, eval)
    with pytest.raises(CheckpointError, match="no weight average"):
        Trainer(resumed, task, checkpoint_dir=tmp_path / "c", **kwargs).fit(train, eval, resume=True)
