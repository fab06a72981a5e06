# Sourced by every device script (benchmarks/gpu_*.sh, benchmarks/run_gpu.sh), from the repository
# root on the GPU machine: where results go, the Python path, the compiler, the target.
export OUT=${OUT:-/tmp/nf4kit_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}
# The image sets CXX=/opt/gcc/bin/g++, whose libstdc++ pieces end up statically inside _C and
# crash on any iostream use (c10::str in TORCH_CHECK); build with the system gcc that matches the
# libstdc++ torch loads.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
# pytest, from the carried wheels (.whl), where the image lacks it
if ! python3 -c "import pytest" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/pytest-*.whl \
    .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/pygments-*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
