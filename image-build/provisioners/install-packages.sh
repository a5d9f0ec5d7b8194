#!/usr/bin/env bash
# Debian packages the appliance needs at run time. One concern: packages.
# Idempotent: the local build's mmdebstrap already includes them, and then no
# apt-get call (and no network) is needed.
set -o errexit -o nounset -o pipefail

# python3-venv: the appliance lives in its own virtual environment (/opt/vsa/venv).
# nmap: optional service-version detection (python-nmap calls the binary).
# ca-certificates: the platform's certificate chains to a public CA on AWS.
PACKAGES=(python3 python3-venv ca-certificates nmap openssh-server)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install --yes --no-install-recommends "${missing[@]}"
else
  echo "packages already installed: ${PACKAGES[*]}"
fi
