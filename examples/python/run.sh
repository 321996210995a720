#!/usr/bin/env bash
# examples/python/run.sh — runs pipeline_lifecycle.py against a running control plane.
#
# Makes a virtualenv (once) with the pinned packages of requirements.txt, generates the
# Python client from proto/ with grpcio-tools into a temporary directory, and runs the
# example. Needs SLUICE_SERVER (host:port of the control plane, plaintext), SLUICE_TOKEN
# (an operator token) and SLUICE_DESTINATION_URL (a PostgreSQL URL the workers reach).
# The virtualenv lives in $SLUICE_PYTHON_VENV (default <repo>/.local/python-venv).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${SLUICE_PYTHON_VENV:-$root/.local/python-venv}

if [[ ! -x $venv/bin/python ]] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  echo "[sluice-python] installing $(tr '\n' ' ' <"$here/requirements.txt")into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi

generated=$(mktemp -d)
trap 'rm -rf "$generated"' EXIT
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$generated" --grpc_python_out="$generated" \
  "$root/proto/sluice/v1/pipeline.proto"
PYTHONPATH=$generated exec "$venv/bin/python" "$here/pipeline_lifecycle.py" "$@"
