"""``torchrun ... tests/fsdp_worker.py CONVERT-ARGS``: ``binarize`` with a Ctrl-C on every process
right after step ``BINARIZE_TEST_STOP_AT`` (the environment variable; unset: no Ctrl-C), as a user's
Ctrl-C reaches every process of a launch. Used by tests/test_distributed.py."""

import os
import signal
import sys

import binarize.train.loop as loop
from binarize.cli import main

stop_at = int(os.environ.get("BINARIZE_TEST_STOP_AT", "-1"))
train_step = loop.train_step


def step_then_ctrl_c(s, step):
    r = train_step(s, step)
    if step == stop_at:
        signal.raise_signal(signal.SIGINT)
    return r


loop.train_step = step_then_ctrl_c
main(sys.argv[1:])
