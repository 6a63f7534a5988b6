# Sourced by quickstart.sh and test.sh: make sure a Python environment with traduire exists.
#  - uses the active virtualenv, or creates and activates .venv in the project;
#  - installs torch's CPU build when no torch is present (PyPI's default Linux wheel is the
#    multi-GB CUDA build);
#  - installs traduire in editable mode with the extras given in $TRADUIRE_EXTRAS.
# Safe to run again: each step is skipped when already done.

set -euo pipefail
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x "$PROJECT_ROOT/.venv/bin/python" ]; then
        say "creating a virtualenv in .venv"
        "$PYTHON" -m venv "$PROJECT_ROOT/.venv"
    fi
    # shellcheck disable=SC1091
    source "$PROJECT_ROOT/.venv/bin/activate"
    say "using virtualenv .venv ($(python --version))"
else
    say "using the active virtualenv $VIRTUAL_ENV"
fi

if python -c "import torch" 2>/dev/null; then
    say "torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
    say "installing torch (CPU build)"
    # A CPU wheel in a local wheel folder (pip's find-links) is used as is; otherwise it comes
    # from PyTorch's CPU index.
    local_wheel=""
    for dir in ${PIP_FIND_LINKS:-} $(python -m pip config get global.find-links 2>/dev/null || true); do
        for wheel in "$dir"/torch-2.13.0+cpu-*.whl; do
            if [ -f "$wheel" ]; then local_wheel="$wheel"; fi
        done
    done
    if [ -n "$local_wheel" ]; then
        python -m pip install -q "torch==2.13.0"
    else
        python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

stamp="$PROJECT_ROOT/.venv-installed${TRADUIRE_EXTRAS:+-$TRADUIRE_EXTRAS}"
if [ ! -f "$stamp" ] || [ "$PROJECT_ROOT/pyproject.toml" -nt "$stamp" ] \
        || ! python -c "import traduire" 2>/dev/null; then
    say "installing traduire${TRADUIRE_EXTRAS:+[$TRADUIRE_EXTRAS]} and its dependencies"
    python -m pip install -q -e "$PROJECT_ROOT${TRADUIRE_EXTRAS:+[$TRADUIRE_EXTRAS]}"
    touch "$stamp"
else
    say "traduire already installed"
fi
