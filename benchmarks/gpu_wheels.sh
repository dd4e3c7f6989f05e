#!/usr/bin/env bash
# Fetch the wheels that benchmarks/gpu_acceptance.py needs on a GPU machine without network:
# megatron-core (the version this project is tested with) for CPython 3.12 manylinux x86_64,
# into .whl/ at the repository root (listed in .git/info/exclude, so it is never committed;
# carry it to the device with the working tree). Its hard requirements (torch, numpy,
# packaging) are on the device already, so it goes alone: never a torch wheel in .whl/, the
# device keeps its own CUDA build of torch.
#
#   bash benchmarks/gpu_wheels.sh                      # megatron-core==0.19.2
#   MCORE_VERSION=0.19.2 bash benchmarks/gpu_wheels.sh
#
# On the device (from the repository root; see the docstring of gpu_acceptance.py):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && ...
set -euo pipefail
cd "$(dirname "$0")/.."

MCORE_VERSION=${MCORE_VERSION:-0.19.2}
# Requirements the device is known to have (torch 2.11 cu130, transformers 5.17 and the
# libraries listed in gpu_acceptance.py's docstring); anything else megatron-core requires is
# downloaded too.
ON_DEVICE="torch numpy packaging transformers safetensors tokenizers sentencepiece tqdm psutil triton matplotlib tensorboard"
MAX_MIB=50

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$1"
}

requires() {  # the unconditional Requires-Dist names of a wheel (extras and markers dropped)
  unzip -p "$1" '*.dist-info/METADATA' | grep '^Requires-Dist:' | grep -v 'extra ==' |
    sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z_' 'a-z-' | sort -u
}

download "megatron-core==${MCORE_VERSION}"
wheel=$(ls .whl/megatron_core-"${MCORE_VERSION}"-*.whl)
echo "megatron-core ${MCORE_VERSION}: $(basename "$wheel")"
for name in $(requires "$wheel"); do
  if [[ " $ON_DEVICE " == *" $name "* ]]; then
    echo "  requires $name: on the device"
  else
    echo "  requires $name: not on the device, downloading"
    download "$name"
  fi
done

if ls .whl | grep -qi '^torch-'; then
  echo "error: a torch wheel is in .whl/; remove it (the device keeps its own torch)" >&2
  exit 1
fi
total=$(du -sm .whl | cut -f1)
echo ".whl/: $(ls .whl | wc -l) wheel(s), ${total} MiB"
ls -l .whl
if (( total >= MAX_MIB )); then
  echo "error: .whl/ is ${total} MiB (limit ${MAX_MIB})" >&2
  exit 1
fi
