#!/usr/bin/env bash
# deploy/local/build-deps.sh — the system packages the Rust build links against:
# OpenSSL headers and pkg-config, for librdkafka's TLS and SASL/SCRAM support.
# Installs them with apt-get when they are missing (needs root, as up.sh does).
set -euo pipefail
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; then
  exit 0
fi
echo "[sluice-deps] installing libssl-dev and pkg-config (librdkafka TLS support)"
if [[ $(id -u) -ne 0 ]]; then
  echo "[sluice-deps] not root: install libssl-dev and pkg-config, then run again" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends libssl-dev pkg-config >/dev/null
