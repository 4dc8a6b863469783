"""The ``fastbd`` command as the distributed tests start it (under ``torchrun`` or alone), with
one fault to inject: with ``FASTBD_TEST_DIE_RANK=r`` and ``FASTBD_TEST_DIE_AFTER=k`` set, rank
``r`` exits hard (``os._exit``, as a killed process would) when its detector starts search round
``k + 1``, after ``k`` rounds were scored."""

import os
import sys

import fastbd.detection.pipeline as pipeline
from fastbd.cli import main

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
