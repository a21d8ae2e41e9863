"""`dapeng` on the toy task in a child process, for the SIGKILL resume test.

Registers the toy task/model, serves the toy splits, pins one thread (float sums must not
depend on the thread count) and, with TOY_STEP_DELAY, sleeps after each step so the
parent can kill it mid-run. Sleeping draws no random numbers, so it cannot change results.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import torch  # noqa: E402

torch.set_num_threads(1)

import _trainer_toy as toy  # noqa: E402

import dapeng.runner as runner  # noqa: E402
from dapeng.cli.main import main  # noqa: E402


class Slow:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_step_end(self, trainer: object) -> None:
        time.sleep(self.delay)


def slow_train(*args, _train=runner.train, **kwargs):
    return _train(*args, callbacks=[Slow(float(os.environ["TOY_STEP_DELAY"]))], **kwargs)


if __name__ == "__main__":
    toy.register()
    runner.load_splits = toy.toy_splits
    if os.environ.get("TOY_STEP_DELAY"):
        runner.train = slow_train
    sys.exit(main(sys.argv[1:]))
