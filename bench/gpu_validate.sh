#!/usr/bin/env bash
# The one prepared GPU run (bench/gpu_validate.py): on the GPU machine, with the project copied
# there. Python wheels the machine lacks (open_clip_torch, ftfy, wcwidth) may travel in .whl/;
# fastbd itself runs from the checkout (PYTHONPATH), nothing else is installed. PYTHON names
# the interpreter (default python3: on the GPU machine, the one that holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastbd-site .whl/*.whl
    export PYTHONPATH="/tmp/fastbd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_validate.py "$@"
