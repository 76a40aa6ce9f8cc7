#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch pinned to the CPU wheel (constraints.txt), rapa in
# editable mode, and with --analog / --ray the optional backends. Idempotent: a second run
# only checks what is there.
#   bash scripts/setup.sh [--analog] [--ray] [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
analog=0; ray=0; test=0
for arg in "$@"; do
  case "$arg" in
    --analog) analog=1 ;;
    --ray) ray=1 ;;
    --test) test=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_q() { pip install -q -c constraints.txt "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
extras=""
[ "$test" = 1 ] && extras="test"
if ! python -c "import torch, rapa" 2>/dev/null || [ -n "$extras" ]; then
  pip_q -e ".${extras:+[$extras]}"
fi
python -c "import torch; assert torch.__version__.startswith('2.'), torch.__version__"
# the tiled convolution's native CPU kernels are compiled with the system C++ compiler (a few
# seconds, cached in ~/.cache/rapa/native), and the C++ operators that call them (against
# torch's headers, about 15 s); without a compiler rapa warns and runs the slower PyTorch path
if [ -z "${CXX:-}" ] && ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    echo "setup.sh: no C++ compiler (apt-get install g++): rapa will use its slower PyTorch path" >&2
  fi
fi
python -c "import rapa.native as n, rapa.ops.native_op as o; print('rapa tiled conv on CPU:', n.describe() + ',', o.describe())"
# Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, where rapa
# looks): `bash scripts/demo.sh` and `rapa reproduce` then train on it, not on the digits fallback
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
   && ! python -c "from rapa.data import load_dataset; load_dataset('fashion-mnist', 'test', limit=1)" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; } \
      || echo "setup.sh: could not install dataset-fashion-mnist: rapa demo will use the digits" >&2
  else
    echo "setup.sh: no Fashion-MNIST (as root: apt-get install dataset-fashion-mnist, or rapa train" \
         "--download): rapa demo will use the digits" >&2
  fi
fi
if [ "$analog" = 1 ] && ! python -c "import aihwkit" 2>/dev/null; then
  # aihwkit 1.2.0 is a source package: it compiles against OpenBLAS (about 4 minutes)
  if [ ! -e /usr/include/x86_64-linux-gnu/cblas.h ] && [ ! -e /usr/include/openblas/cblas.h ] \
     && ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq libopenblas-dev >/dev/null
    else
      echo "setup.sh: aihwkit needs libopenblas-dev (apt-get install libopenblas-dev)" >&2; exit 1
    fi
  fi
  pip_q "cmake>=4.2.1" "pybind11>=3.0.1" "scikit-build>=0.18.1" ninja wheel mypy \
        scipy protobuf requests tqdm
  pip_q --no-build-isolation --no-deps aihwkit==1.2.0
  python -c "import aihwkit; print('aihwkit', aihwkit.__version__)"
fi
if [ "$ray" = 1 ] && ! python -c "import ray" 2>/dev/null; then
  pip_q "ray>=2.9"
fi
