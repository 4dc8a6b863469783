"""Every Triton kernel launch variant compiles for sm_80 and sm_90 without a GPU, spills no
register and does no 64-bit integer division (``bench/kernel_compile.py``); the table of
registers, shared memory and PTX instructions is printed (``pytest -s``). The sweep runs in a
subprocess: the test session runs the kernels through Triton's interpreter, which cannot
compile them."""

import json
import os
import subprocess
import sys
from pathlib import Path

from kernel_compile import ARCHS, SPECIALIZATIONS, divisibility_attrs, instruction_counts, table

SCRIPT = Path(__file__).with_name("kernel_compile.py")


def test_every_kernel_variant_compiles_without_spills(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", *map(str, ARCHS), "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    print("\n" + table(rows))
    assert done.returncode == 0, done.stderr[-2000:]
    assert {r["kernel"] for r in rows} == {"mask_fill", "paste", "kmeans_assign", "pair_cosine",
                                         "cosine_topk"}
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS} and len(rows) >= 60
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
