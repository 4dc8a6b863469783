"""The ``fastbd`` command as the distributed tests start it (under ``torchrun`` or alone), with
faults to inject, each an exit as hard as a killed process's (``os._exit(17)``):

* ``FASTBD_TEST_DIE_RANK=r`` and ``FASTBD_TEST_DIE_AFTER=k``: rank ``r`` exits when its
  detector starts search round ``k + 1``, after ``k`` rounds were scored;
* ``FASTBD_TEST_DIE_AFTER_SAVE=k``: the writing rank exits right after it saved a training
  state after ``k`` units (epochs)."""

import os
import sys

import fastbd.detection.pipeline as pipeline
from fastbd.cli import main
from fastbd.storage import TrainingState

if "FASTBD_TEST_DIE_AFTER_SAVE" in os.environ:
    units_before = int(os.environ["FASTBD_TEST_DIE_AFTER_SAVE"])
    save = TrainingState.save

    def save_then_die(self, units_done, **kwargs):
        save(self, units_done, **kwargs)
        if self.writer and self.path is not None and units_done == units_before:
            os._exit(17)

    TrainingState.save = save_then_die

if "FASTBD_TEST_DIE_RANK" in os.environ:
    dying_rank = int(os.environ["FASTBD_TEST_DIE_RANK"])
    rounds_before = int(os.environ["FASTBD_TEST_DIE_AFTER"])
    scored = pipeline.score_round
    calls = []

    def score_round_then_die(*args, **kwargs):
        calls.append(None)
        if len(calls) > rounds_before and int(os.environ.get("RANK", "0")) == dying_rank:
            os._exit(17)
        return scored(*args, **kwargs)

    pipeline.score_round = score_round_then_die

sys.exit(main())
