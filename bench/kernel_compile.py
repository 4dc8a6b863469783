"""Compile every Triton kernel launch variant for NVIDIA targets with no GPU present and report
what the compiled code shows: registers, spills and shared memory (``ptxas -v``), PTX
instructions and the 64-bit integer divisions/remainders in them (each a ~80-instruction
subroutine call on NVIDIA GPUs).

    python bench/kernel_compile.py [--arch 80 90] [--json bench/results/kernel-compile.json]

Exits 1 when a variant fails to compile or spills. The variants are each kernel module's
``compile_variants()``: every (dtype, constexpr) combination its op launches on CUDA. Each is
compiled twice, as Triton's JIT would specialise it: ``generic`` (no argument known to be a
multiple of 16: offset views, odd sizes) and ``aligned`` (every pointer 16-byte aligned and every
integer argument a multiple of 16, as at 224² images or 768-wide features — the case where the
compiler can vectorise and pipeline the loads). The variants compile in parallel, one process per
core.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

ARCHS = (80, 90)
SPECIALIZATIONS = ("generic", "aligned")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")
"""Keys of a variant's constexprs that are launch options, not kernel arguments."""


def kernel_table() -> dict[str, tuple[object, list]]:
    """Kernel name → (jitted function, its launch variants)."""
    from fastbd.kernels import cosine, kmeans, mask_fill, paste

    return {"mask_fill": (mask_fill.mask_fill_kernel, mask_fill.compile_variants()),
            "paste": (paste.paste_kernel, paste.compile_variants()),
            "kmeans_assign": (kmeans.kmeans_assign_kernel, kmeans.compile_variants()),
            "pair_cosine": (cosine.pair_cosine_kernel, cosine.compile_variants()),
            "cosine_topk": (cosine.cosine_topk_kernel, cosine.compile_topk_variants())}


def ptxas_path() -> str:
    import triton

    found = glob.glob(os.path.join(os.path.dirname(triton.__file__),
                                   "backends", "nvidia", "bin", "ptxas"))
    if not found:
        raise FileNotFoundError("Triton's bundled ptxas was not found")
    return found[0]


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and static shared memory of the PTX's kernel (``ptxas -v``)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        done = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu, handle.name, "-o",
                               os.devnull], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()[-300:]}")
    text = done.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return {"registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"),
            "shared_bytes": number(r"(\d+) bytes smem")}


def instruction_counts(ptx: str) -> dict[str, int]:
    """PTX instructions in the kernel body and its 64-bit integer divisions and remainders."""
    body = [line.strip() for line in ptx.splitlines()
            if line.strip().endswith(";") and not line.strip().startswith(("//", "."))]
    wide = sum(1 for line in body if re.match(r"(div|rem)\.[su]64", line))
    return {"ptx_instructions": len(body), "int64_div_rem": wide}


def divisibility_attrs(signature: dict) -> dict:
    """Triton's JIT hint for arguments it sees divisible by 16: every pointer and integer."""
    return {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values())
            if kind.startswith("*") or kind in ("i32", "i64")}


def compile_variant(fn, signature: dict, constexprs: dict, arch: int,
                    spec: str = "generic") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    options = {name: constexprs.pop(name) for name in LAUNCH_OPTIONS if name in constexprs}
    options.setdefault("num_warps", 4)
    attrs = divisibility_attrs(signature) if spec == "aligned" else {}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                        attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    report = ptxas_report(ptx, arch)
    # Triton allocates shared memory dynamically: its size is in the metadata, not ptxas's
    report["shared_bytes"] = max(report["shared_bytes"], int(compiled.metadata.shared))
    return {**report, **instruction_counts(ptx), **options,
            "compile_s": time.perf_counter() - start}


def _compile_row(job: tuple[str, int, int, str]) -> dict:
    kernel, index, arch, spec = job
    fn, variants = kernel_table()[kernel]
    name, signature, constexprs = variants[index]
    row = {"kernel": kernel, "variant": name, "arch": f"sm_{arch}", "spec": spec}
    try:
        row.update(compile_variant(fn, signature, constexprs, arch, spec))
    except Exception as error:  # a failed variant is reported, the sweep goes on
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return row


def sweep(archs=ARCHS, kernels: list[str] | None = None, workers: int | None = None,
          sample: bool = False) -> list[dict]:
    """One row per (kernel variant, arch, specialisation): the figures, or ``error``.
    ``sample``: each kernel's first variant only (both specialisations), a quick check."""
    jobs = [(kernel, index, arch, spec)
            for kernel, (_, variants) in kernel_table().items()
            if not kernels or kernel in kernels
            for index in range(1 if sample else len(variants)) for arch in archs
            for spec in SPECIALIZATIONS]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_row(job) for job in jobs]
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that imported torch
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        return list(pool.map(_compile_row, jobs))


def failures(rows: list[dict]) -> list[str]:
    """The rows that failed to compile or spill registers."""
    return [f"{r['variant']} {r['arch']} {r['spec']}: {r.get('error') or 'spills'}" for r in rows
            if "error" in r or r.get("spill_stores") or r.get("spill_loads")]


def table(rows: list[dict]) -> str:
    head = (f"{'variant':<46} {'arch':<6} {'spec':<8} {'regs':>5} {'spill':>6} {'smem':>7} "
            f"{'ptx':>6} {'div64':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<46} {r['arch']:<6} {r['spec']:<8} ERROR {r['error']}")
            continue
        lines.append(f"{r['variant']:<46} {r['arch']:<6} {r['spec']:<8} {r['registers']:>5} "
                     f"{r['spill_stores'] + r['spill_loads']:>6} {r['shared_bytes']:>7} "
                     f"{r['ptx_instructions']:>6} {r['int64_div_rem']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--kernel", nargs="*", help="only these kernels")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--workers", type=int, help="compiler processes (default: one per core)")
    parser.add_argument("--sample", action="store_true",
                        help="each kernel's first variant only (a quick check)")
    args = parser.parse_args(argv)
    rows = sweep(args.arch, args.kernel, args.workers, args.sample)
    print(table(rows))
    if args.json:
        from fastbd.storage import write_text_atomically

        write_text_atomically(json.dumps(rows, indent=2), args.json)
    bad = failures(rows)
    if bad:
        print("\n".join(["failed:", *bad]), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
