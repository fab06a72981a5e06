"""Probe (device): an interleaved A/B of two builds of nf4kit (for a device-code change that has no
switch). OLD=/path/to/tree (a copy of the repository holding the other build's nf4kit/_C*.so), the
current tree is NEW. Each round runs ab_paths.py once per build (ROUNDS=1 inside, a fresh process
each, the order rotated every round) on LAYERS (4096x4096,14336x4096) at MS (96,128) with the
dispatch's own path, and records nf4kit's time and its ratio to the cuBLAS call timed in the same
process. Prints the median over AB_ROUNDS (5) rounds per build, layer and batch, and the fastest
and the slowest round."""
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NEW = os.path.dirname(os.path.dirname(HERE))


def once(tree, layer, ms):
    env = dict(os.environ, LAYER=layer, MS=ms, PATHS="auto", ROUNDS="1")
    env["PYTHONPATH"] = os.pathsep.join([tree, os.path.join(NEW, ".bnb"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(tree, "benchmarks", "probes", "ab_paths.py")], env=env,
                         capture_output=True, text=True, cwd=tree).stdout
    got = {}
    for m, cub, auto in re.findall(r"M=\s*(\d+) cublas ([\d.]+) .*? auto ([\d.]+)", out):
        got[int(m)] = (float(auto), float(cub) / float(auto))
    return got


def main():
    old = os.environ["OLD"]
    layers = os.environ.get("LAYERS", "4096x4096,14336x4096").split(",")
    ms = os.environ.get("MS", "96,128")
    rounds = int(os.environ.get("AB_ROUNDS", "5"))
    builds = {"old": old, "new": NEW}
    res = {}
    for r in range(rounds):
        order = list(builds) if r % 2 == 0 else list(builds)[::-1]
        for layer in layers:
            for b in order:
                for m, v in once(builds[b], layer, ms).items():
                    res.setdefault((layer, m, b), []).append(v)
        report(res, layers, builds, r + 1)  # after every round, so that a timeout keeps what ran


def report(res, layers, builds, rounds):
    print(f"# ab_builds: median of {rounds} rounds, one process per build and round; ms (ratio to cuBLAS in that process)")
    for layer in layers:
        for m in sorted({k[1] for k in res if k[0] == layer}):
            line = f"{layer} M={m:5d}"
            for b in builds:
                v = res.get((layer, m, b), [])
                if v:
                    ts = sorted(t for t, _ in v)
                    line += (f" | {b} {statistics.median(ts):.4f} ({statistics.median(x for _, x in v):.2f}x;"
                             f" {ts[0]:.4f}-{ts[-1]:.4f})")
            print(line, flush=True)


if __name__ == "__main__":
    main()
