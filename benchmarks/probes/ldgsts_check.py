"""Local check of a compiled object (no GPU): LDGSTS instructions (cp.async) that read a uniform
register no instruction of their kernel writes.

ptxas 13.0 sometimes compiles a `cp.async ... .L2::cache_hint` into `LDGSTS [R + URa], desc[URb]` with
URb never written. On the H200 that was an illegal instruction: the twenty-second session's
test_cuda_one_output_feature_bf16, and the twenty-third session's in-loop L2 prefetch build, which
failed test_cuda_kernels_forced[skinny] (48 such LDGSTS in that build). The landed builds have none.
What the cases had in common: more uniform registers live in the loop (that build's per-warp
prefetch addresses; the persistent kernel's tile count and row jump, until they were moved to
per-thread registers). Run it on an object before spending device time on it:
    nvcc ... -c csrc/cuda/gemm_4bit.cu -o /tmp/g4.o && python3 benchmarks/probes/ldgsts_check.py /tmp/g4.o
CUOBJDUMP names cuobjdump (default: the one on PATH, else triton's copy in the local venv)."""
import glob
import os
import re
import shutil
import subprocess
import sys


def cuobjdump() -> str:
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    found = shutil.which("cuobjdump") or glob.glob("/usr/local/cuda/bin/cuobjdump")
    if found:
        return found if isinstance(found, str) else found[0]
    return glob.glob(".venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump")[0]


def written_uniform(ins: list) -> set:
    """Uniform registers an instruction writes: its first operand when that is URn (URn and URn + 1
    for 64-bit forms)."""
    out = set()
    for t in ins:
        body = re.sub(r"^@!?U?P[T\d]+ ", "", t)
        op, _, args = body.partition(" ")
        m = re.match(r"UR(\d+)\b", args.strip())
        if m:
            n = int(m.group(1))
            out.add(n)
            if ".64" in op or ".WIDE" in op:
                out.add(n + 1)
    return out


def kernels(path: str):
    """Each kernel of a compiled object: (mangled name, [(address, instruction text), ...])."""
    sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    for blk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = blk.split("\n", 1)[0].strip()
        yield name, [(int(a, 16), re.sub(r"\s+", " ", t).strip())
                     for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", blk)]


def main(path: str) -> int:
    bad = total = 0
    for name, listing in kernels(path):
        ins = [t for _, t in listing]
        written = written_uniform(ins)
        for t in ins:
            if "LDGSTS" not in t:
                continue
            total += 1
            missing = [u for u in map(int, re.findall(r"\bUR(\d+)\b", t)) if u not in written]
            if missing:
                bad += 1
                print(f"{name[-80:]}: {t}  (UR{missing} never written)")
    print(f"{bad} of {total} LDGSTS read a uniform register their kernel never writes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
