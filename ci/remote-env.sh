#!/usr/bin/env bash
# Build `.venv-remote`: the Python 3.12 environment the remote tests run in.
#
# The tests start a real NDIF stack (ndif 0.1.2, which needs Python >= 3.12) on
# 127.0.0.1: Redis, an S3 stand-in (moto), a Ray head, NDIF's controller and API,
# and a CPU model actor. This script installs all of it, plus the package's
# dependencies and test dependencies. Safe to run again: every step skips what is
# already there.
#
# The package itself is NOT installed here: the NDIF server processes run from
# this environment too, and a server that could import the package would hide a
# request that fails to ship it. The tests import it from `src/` (`PYTHONPATH=src`).
#
# Usage: bash ci/remote-env.sh            (from anywhere; builds <repo>/.venv-remote)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON312=${PYTHON312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
VENV=.venv-remote

if ! command -v redis-server >/dev/null 2>&1; then
  echo "remote-env: installing redis-server (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "remote-env: creating $VENV with $PYTHON312"
  "$PYTHON312" -m venv "$VENV"
fi

pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
# torch first, pinned, so that ndif's dependencies do not pick another build.
pip install "torch==2.14.1"
pip install "ndif[api,ray]==0.1.2" "moto[server]"
# The package's dependencies and test extra, read from pyproject.toml, without the package.
"$VENV/bin/python" - <<'PY' > "$VENV/package-requirements.txt"
import tomllib
import re
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]

def expand(requirements):
    # The `test` extra names other extras of this package (`nnsight-toolbox[peft,...]`):
    # list their requirements instead, since the package itself must stay out of this env.
    for requirement in requirements:
        self_reference = re.fullmatch(r"nnsight-toolbox\[(.*)\]", requirement.strip())
        if self_reference:
            yield from expand(r for name in self_reference[1].split(",") for r in extras[name.strip()])
        else:
            yield requirement

print("\n".join(project["dependencies"] + list(expand(extras["test"]))))
PY
pip install -r "$VENV/package-requirements.txt"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
print("remote-env: ready:", ", ".join(f"{name} {version(name)}" for name in ("ndif", "nnsight", "ray", "torch", "transformers")))
PY
