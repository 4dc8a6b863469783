"""Every Triton kernel launch variant compiles for sm_80 and sm_90 without a GPU, spills no
register and does no 64-bit integer division (``bench/kernel_compile.py``); the table of
registers, shared memory and PTX instructions is printed (``pytest -s``). The sweep runs in a
subprocess: the test session runs the kernels through Triton's interpreter, which cannot
compile them. ``make test`` compiles each kernel's first variant in both specialisations for
sm_90 in one process (seconds); the full sweep (hundreds of cold compiles) runs under
``make bench`` (``FASTBD_FULL_SWEEPS=1``). The sweep's process group is killed whatever ends
the test, so no compiler process outlives it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_compile import ARCHS, SPECIALIZATIONS, divisibility_attrs, instruction_counts, table

SCRIPT = Path(__file__).with_name("kernel_compile.py")


FULL = os.environ.get("FASTBD_FULL_SWEEPS") == "1"


def run_in_own_group(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` in a new process group; (exit code, stderr). The group — the sweep and its
    spawned compiler workers — is killed when the call ends, however it ends."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=timeout)
        return process.returncode, err
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@pytest.mark.parametrize("full", [
    False, pytest.param(True, marks=pytest.mark.skipif(
        not FULL, reason="the full sweep runs under make bench (FASTBD_FULL_SWEEPS=1)"))],
    ids=["sample", "full"])
def test_every_kernel_variant_compiles_without_spills(tmp_path, full):
    out = tmp_path / "kernels.json"
    archs = ARCHS if full else (90,)
    flags = [] if full else ["--sample", "--workers", "1"]
    code, err = run_in_own_group([sys.executable, str(SCRIPT), "--arch", *map(str, archs),
                                  "--json", str(out), *flags], timeout=600 if full else 240)
    rows = json.loads(out.read_text())
    print("\n" + table(rows))
    assert code == 0, err[-2000:]
    assert {r["kernel"] for r in rows} == {"mask_fill", "paste", "kmeans_assign", "pair_cosine",
                                         "cosine_topk"}
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in archs}
    assert len(rows) >= (60 if full else 10)
    assert {r["spec"] for r in rows} == set(SPECIALIZATIONS)
    assert not [r for r in rows if "error" in r or r["spill_stores"] or r["spill_loads"]]
    assert [r["variant"] for r in rows if r["int64_div_rem"]] == []
    assert all(r["registers"] > 0 and r["ptx_instructions"] > 0 for r in rows)


def test_instruction_counts_see_64_bit_division():
    ptx = "\n".join(["//", ".reg .b64 %rd<4>;", "ld.global.u64 %rd1, [%rd0];",
                     "rem.s64 %rd2, %rd1, %rd3;", "div.u64 %rd2, %rd1, %rd3;",
                     "rem.s32 %r1, %r2, %r3;", "ret;"])
    assert instruction_counts(ptx) == {"ptx_instructions": 5, "int64_div_rem": 2}


def test_the_aligned_specialisation_hints_pointers_and_integers_only():
    signature = {"x_ptr": "*bf16", "n": "i32", "eps": "fp32", "BLOCK": "constexpr", "m": "i64"}
    assert divisibility_attrs(signature) == {(0,): [["tt.divisibility", 16]],
                                             (1,): [["tt.divisibility", 16]],
                                             (4,): [["tt.divisibility", 16]]}
