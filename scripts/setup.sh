#!/usr/bin/env bash
# Set up everything regrow needs on a fresh Debian machine with Python >= 3.10:
# a virtual environment, the CPU build of torch (before the project, so nothing pulls CUDA packages),
# the project with its test tools, and the Fashion-MNIST data (Debian package) when it is missing.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    $pip install --quiet "torch==2.13.0"
fi
# Hold torch at the version installed: an optional dependency that asks for a newer one then resolves to an
# older release of itself instead of pulling another torch (and its CUDA packages).
constraints="$(mktemp)"
"$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$constraints"
$pip install --quiet -c "$constraints" -e ".[dev]"
rm -f "$constraints"

data_dir="${REGROW_DATA_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$data_dir/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
            apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist) with sudo"
        sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
            sudo apt-get update -q >/dev/null && sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
        echo "setup: Fashion-MNIST is missing from $data_dir and apt-get cannot be used here." >&2
        echo "       Install the Debian package dataset-fashion-mnist, or set REGROW_DATA_DIR to a folder" >&2
        echo "       with the four idx .gz files. Tests on real data are skipped until then." >&2
    fi
fi
echo "setup: ready ($("$venv/bin/python" -c 'import torch, regrow; print("torch", torch.__version__, "/ regrow", regrow.__version__)'))"
