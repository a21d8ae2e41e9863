"""`dapeng` on the toy task in each process torchrun starts, for the distributed tests.

Registers the toy task/model, serves the toy splits (TOY_RECORDS of them, default 160),
pins one thread per rank and, with TOY_STEP_DELAY, sleeps after each step so the parent
can kill a rank mid-run (each rank writes its pid to TOY_PID_DIR/rank{R}); with TOY_STOP_AT,
training stops cleanly after that step (a run to resume); with TOY_FAIL_RANK, that rank
fails before it joins the others.
"""

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import torch  # noqa: E402

torch.set_num_threads(1)

import _trainer_toy as toy  # noqa: E402

import dapeng.runner as runner  # noqa: E402
from dapeng.cli.main import main  # noqa: E402
from dapeng.train.trainer import StopTraining  # noqa: E402


class Slow:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_step_end(self, trainer: object) -> None:
        time.sleep(self.delay)


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: object) -> None:
        if trainer.state.step == self.step:
            raise StopTraining(f"stopped at step {self.step}")


def splits(cfg: object = None) -> object:
    from dapeng.data.splits import Splits

    n = int(os.environ.get("TOY_RECORDS", 160))
    records = toy.make_records(n)
    train, eval_ = int(n * 0.7), int(n * 0.85)
    return Splits(records[:train], records[train:eval_], records[eval_:])


def train_with_callbacks(*args, _train=runner.train, **kwargs):
    callbacks = []
    if os.environ.get("TOY_STEP_DELAY"):
        callbacks.append(Slow(float(os.environ["TOY_STEP_DELAY"])))
    if os.environ.get("TOY_STOP_AT"):
        callbacks.append(StopAt(int(os.environ["TOY_STOP_AT"])))
    return _train(*args, callbacks=callbacks, **kwargs)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung rank's stacks, on demand
    if "TOY_FAIL_RANK" in os.environ and os.environ["TOY_FAIL_RANK"] == os.environ.get("RANK"):
        sys.exit("rank failed to start")
    if os.environ.get("TOY_PID_DIR"):
        Path(os.environ["TOY_PID_DIR"], f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
    toy.register()
    runner.load_splits = splits
    runner.train = train_with_callbacks
    sys.exit(main(sys.argv[1:]))
