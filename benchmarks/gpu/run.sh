#!/usr/bin/env bash
# The prepared GPU check of issue 16: one unattended command on a CUDA machine (about 5 minutes on an H200).
#   bash benchmarks/gpu/run.sh OUT_FOLDER [extra run.py options, e.g. --parts training]
# It installs leanformer from this working tree into the machine's own Python (no downloads: torch, Triton,
# transformers, timm and peft must already be there), runs the CUDA-marked tests, then benchmarks/gpu/run.py, which
# writes OUT_FOLDER/gpu.json, summary.md and gpu.png and prints the summary.
set -uo pipefail
out=${1:?usage: benchmarks/gpu/run.sh OUT_FOLDER [run.py options]}
shift
cd "$(dirname "$0")/../.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LEANFORMER_NATIVE=0  # the CPU kernels are not what is measured here: skip their build
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 2; }
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
# correctness first, on the device: the CUDA-marked tests (and the Triton kernels' own tests, compiled, not interpreted)
timeout 150 $PY -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/cuda_tests.txt" | tail -15
timeout 330 $PY benchmarks/gpu/run.py "$out" "$@"
