"""The ``fastbd`` command: a thin layer over the library, one module per command family —
``demo`` (the demo and ``env``), ``world`` (``attack``), ``train`` (``train-ssl``,
``train-clip``, ``eval``: the synthetic world or the user's files), ``detect`` (every
registered detector), ``defend`` (every registered CLIP defense), ``density`` (poisoned pairs
by embedding density), ``loop`` (a paper's whole loop over those commands)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fastbd.cli import defend, demo, density, detect, loop, train, world
from fastbd.cli.common import positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastbd", description="Find and remove data-poisoning backdoors: PoisonCAM and "
        "PatchSearch for SSL image encoders, UBT, CleanCLIP and ABL for CLIP models.",
        epilog="`fastbd <command> --help` shows a command's flags, defaults and examples.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for torch (default: torch's, one per core — on a "
                             "machine busy with other work fewer are faster)")
    parser.add_argument("--dist-timeout", type=positive_int, default=1800, metavar="S",
                        help="under torchrun: seconds a rank waits for the others in a "
                             "collective before the job fails (instead of hanging)")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (demo, world, train, detect, defend, density, loop):
        family.add_parsers(sub)
    return parser


DEBUG_VARIABLE = "FASTBD_DEBUG"
"""Set (to anything) in the environment, the command shows the traceback of a failure instead of
its one-line message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, ``kill`` and job schedulers send), raised in the main thread
    like Ctrl-C so that every ``finally`` and checkpoint runs the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def _error_line(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) \
            and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error).replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command: 0 on success, 1 on failed checks, 2 when the input was unusable (a
    missing, unreadable or malformed file, a bad value, an output folder that cannot be
    written: one line on stderr naming it), 3 when another rank of a ``torchrun`` job failed,
    130 when interrupted by Ctrl-C (SIGINT) and 143 by
    SIGTERM — both after saving what a rerun continues from, with a line saying how."""
    import os
    import signal

    from fastbd import distributed
    from fastbd.devices import keep_cpu_heap

    args = build_parser().parse_args(argv)
    keep_cpu_heap()  # CPU batches reuse freed memory instead of faulting in fresh pages
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    name = f"fastbd {args.command}"
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if distributed.launched():
            name = _join_world(args, name)
        # fastbd's own progress at INFO; other libraries (open_clip, timm) only warn.
        logging.basicConfig(level=logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("fastbd").setLevel(logging.WARNING if args.quiet else logging.INFO)
        return args.run(args)
    except (OSError, ValueError) as error:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"{name}: error: {_error_line(error)} (set {DEBUG_VARIABLE}=1 for the "
              "traceback)", file=sys.stderr)
        return 2
    except distributed.RankLost as error:  # a collective failed: another rank is gone
        if os.environ.get(DEBUG_VARIABLE):
            raise
        hint = (f"; rerun with --resume (any number of ranks) to continue from the last "
                f"completed search round in {args.out}" if getattr(args, "resumable", False)
                else "")
        print(f"{name}: error: the job lost a rank ({_error_line(error)[:200]}){hint}",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt as interrupt:
        if getattr(args, "resume", None) is not None:
            hint = (f"; rerun with --resume to continue from the last completed search round "
                    f"and the poison classifier's last saved state in {args.out}")
        elif getattr(args, "continued_by_rerun", False):
            hint = "; rerun the same command to continue training from its last completed epoch"
        else:
            hint = ""
        terminated = isinstance(interrupt, Terminated)
        print(f"{name}: {'terminated' if terminated else 'interrupted'}{hint}",
              file=sys.stderr)
        return 128 + interrupt.signum if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.stop()


def _join_world(args, name: str) -> str:
    """Join the ``torchrun`` world: this rank's device in ``args.device``; ranks other than 0
    quiet (no bars, logs below warnings, nothing on stdout). Returns the command's name for
    messages, tagged with the rank. Refuses a command that cannot share its work over more
    than one rank."""
    import os

    from fastbd import distributed

    size = int(os.environ["WORLD_SIZE"])
    if size > 1 and not getattr(args, "distributed", False):
        raise ValueError(f"{name} runs in one process; start it without torchrun (or with "
                         "--nproc_per_node=1). Under torchrun: poisoncam, patchsearch, ubt, "
                         "cleanclip, abl, train-ssl, train-clip")
    device = distributed.start(getattr(args, "device", "cpu"), args.dist_timeout)
    if hasattr(args, "device"):
        args.device = str(device)
    here = distributed.world()
    if not here.main:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — the process's stdout until exit
    return f"{name} (rank {here.rank} of {here.size})"


if __name__ == "__main__":
    sys.exit(main())
