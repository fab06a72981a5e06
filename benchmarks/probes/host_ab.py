"""Probe (device): host time per call of two versions of nf4kit.functional in one process, interleaved,
so that the host's drift (host_time.py's single passes differ by up to 10 us) falls on both alike.
OLD_FUNCTIONAL=path/to/functional.py (another version of nf4kit/functional.py, e.g. `git show
HEAD~1:nf4kit/functional.py`) is loaded as the module nf4kit._functional_old next to this tree's. For
each grad mode in GRADS (no_grad,inference), LAYER (4096x4096), batch M (1), ROUNDS (15) rounds of
CALLS (300) calls each of cuBLAS (F.linear), the old and the new matmul_4bit, in rotating order, each
round queued behind a GPU sleep (host_time.host_us): median and min microseconds per call."""
import contextlib
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_matmul import env_int, env_list, quantize  # noqa: E402
from host_time import interleaved  # noqa: E402

import nf4kit.functional as F  # noqa: E402
import torch.nn.functional as TF  # noqa: E402


def load_old(path):
    spec = importlib.util.spec_from_file_location("nf4kit._functional_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    old = load_old(os.environ["OLD_FUNCTIONAL"])
    K, N = (int(v) for v in os.environ.get("LAYER", "4096x4096").split("x"))
    M, rounds, calls = env_int("M", 1), env_int("ROUNDS", 15), env_int("CALLS", 300)
    modes = {"no_grad": torch.no_grad, "inference": torch.inference_mode, "on": contextlib.nullcontext}
    print(f"# host_ab on {torch.cuda.get_device_name()}, torch {torch.__version__}: {K}x{N} batch {M}, fp16, "
          f"{rounds} rounds x {calls} calls; us per call, median (min)")
    g = torch.Generator(device="cuda").manual_seed(K + N)
    W = torch.randn(N, K, device="cuda", dtype=torch.float16, generator=g) * 0.02
    A = torch.randn(M, K, device="cuda", dtype=torch.float16, generator=g)
    Bq, qs_new = quantize(W)
    # the old module's own QuantState class (its checks test isinstance against it)
    qs_old = old.QuantState(absmax=qs_new.absmax, shape=qs_new.shape, code=qs_new.code, blocksize=qs_new.blocksize,
                            quant_type=qs_new.quant_type, dtype=qs_new.dtype, offset=qs_new.offset,
                            state2=qs_new.state2)
    cands = {"cublas": lambda: TF.linear(A, W), "old": lambda: old.matmul_4bit(A, Bq.t(), qs_old),
             "new": lambda: F.matmul_4bit(A, Bq.t(), qs_new)}
    assert torch.equal(cands["old"](), cands["new"]()), "old and new differ"
    interleaved(cands, [(m, modes[m]) for m in env_list("GRADS", "no_grad,inference")], rounds, calls)


if __name__ == "__main__":
    main()
