"""Local look at a compiled object (no GPU): for each kernel whose mangled name contains FILTER, its
main loop (the backward branch whose body holds the most HMMA / HGMMA, then the longest) in SASS
instructions, and the loop's instructions by opcode. The instruction budget per stage is what the
batch-1 kernel's per-byte rate rests on (twenty-fourth session, matmul.md):
    nvcc ... -c csrc/cuda/gemm_4bit.cu -o /tmp/g4.o
    python3 benchmarks/probes/sass_loop.py /tmp/g4.o gemm4_skinny_kernelIN3c104HalfELi1ELi2ELi32ELb1E
(that filter: fp16, one n8 tile, whole stages, 32 rows, V2: the batch-1 kernel of the benchmark layers)."""
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ldgsts_check import kernels  # noqa: E402


def main_loop(ins: list) -> tuple:
    """(first address, last address, body) of the kernel's main loop; ins: (address, text) pairs."""
    best = None
    for a, t in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
        if not m or int(m.group(1), 16) >= a:
            continue
        lo = int(m.group(1), 16)
        body = [x for b, x in ins if lo <= b <= a]
        key = (sum(1 for x in body if "MMA" in x), len(body))
        if best is None or key > best[0]:
            best = (key, lo, a, body)
    return (None, None, []) if best is None else best[1:]


def main(path: str, flt: str) -> None:
    for name, ins in kernels(path):
        if flt not in name:
            continue
        lo, hi, body = main_loop(ins)
        ops = collections.Counter(re.sub(r"^@!?U?P[T\d]+ ", "", x).split(" ")[0].split(".")[0] for x in body)
        print(f"{name[-90:]}: {len(ins)} instructions, main loop {len(body)}"
              + (f" ({lo:#x}..{hi:#x})" if body else ""))
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
