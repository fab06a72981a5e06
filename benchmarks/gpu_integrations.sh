#!/bin/bash
# One device call for the integrations (nf4kit/nn, nf4kit/integrations): build the CUDA kernels the
# layers use, run the CUDA-parametrised tests of test_nn / test_compile / test_transformers /
# test_peft, then QLoRA through transformers + PEFT vs bf16 LoRA and nf4kit vs bitsandbytes CUDA
# (benchmarks/gpu_integrations.py). Logs land in $OUT: build.log, tests.log, integrations.json,
# integrations.log. Run from the repository root with .bnb (and .whl: pytest wheels) carried.
set -o pipefail
source benchmarks/gpu_env.sh
export NF4KIT_CUDA_SOURCES=${NF4KIT_CUDA_SOURCES:-quantize_4bit.cu,dequantize_4bit.cu,blockwise8.cu,gemm_4bit.cu}
LOG=$OUT/integrations.log
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
python3 -c "import peft; print('peft', peft.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
stamp "built ($NF4KIT_CUDA_SOURCES)"
python3 -m nf4kit info 2>&1 | tee -a "$LOG"

timeout ${TEST_TIMEOUT:-110} python3 -m pytest -q -rs -p no:cacheprovider --maxfail=20 \
  tests/test_nn.py tests/test_compile.py tests/test_transformers.py tests/test_peft.py tests/test_config.py \
  -k "cuda or gpu" > "$OUT/tests.log" 2>&1
stamp "tests rc=$?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -2 | tee -a "$LOG"
grep -E "^(FAILED|ERROR)|Error:|^E " "$OUT/tests.log" | head -30 | tee -a "$LOG"

timeout ${QLORA_TIMEOUT:-100} python3 benchmarks/gpu_integrations.py --out "$OUT" > "$OUT/qlora.log" 2>&1
stamp "qlora rc=$?"
tail -60 "$OUT/qlora.log" | tee -a "$LOG"
