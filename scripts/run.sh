#!/usr/bin/env bash
# Set up the project's virtual environment (.venv, reused when current) and run a job in it.
#   bash scripts/run.sh demo    inspect, patch and export the built-in example model
#   bash scripts/run.sh test    ruff, mypy and the test suite
#   bash scripts/run.sh bench   the benchmarks (slow)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3}"

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv" >&2
    "$py" -m venv "$venv"
  fi
  # Reinstall only when the project's declared dependencies changed.
  local stamp="$venv/.regsurgery-installed" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing regsurgery[dev] into $venv (first time: torch is a large download)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -e ".[dev]" >&2
    echo "$want" > "$stamp"
  fi
}

job="${1:-demo}"
shift || true
setup
case "$job" in
  demo)
    out="$root/demo_out"
    rm -rf "$out" && mkdir -p "$out"
    set -x
    "$venv/bin/regsurgery" inspect regsurgery:example "$@"
    "$venv/bin/regsurgery" patch regsurgery:example --drop-path 0.1 --drop-block 0.1 --block-size 3 \
      --out "$out/example_patched.pt"
    "$venv/bin/regsurgery" export "$out/example_patched.pt" --onnx "$out/example.onnx"
    ;;
  test)
    # Lint and types first (seconds), then the suite.
    "$venv/bin/ruff" check regsurgery tests benchmarks examples
    "$venv/bin/mypy" regsurgery
    exec "$venv/bin/python" -m pytest -q "$@"
    ;;
  bench)
    for b in benchmarks/*.py; do echo "== $b"; "$venv/bin/python" "$b" "$@"; done
    ;;
  *)
    echo "usage: bash scripts/run.sh [demo|test|bench]" >&2
    exit 2
    ;;
esac
