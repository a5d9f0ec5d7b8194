#!/usr/bin/env bash
# The appliance in its own virtual environment, from the wheel built from this
# repository. One concern: the Python software.
#
# VSA_WHEEL_DIR holds vsa_appliance-*.whl and, optionally, wheels of its
# dependencies (a wheelhouse). With VSA_PIP_OFFLINE=1 nothing is fetched from
# an index: the local build installs from the wheelhouse it prepared.
set -o errexit -o nounset -o pipefail

VSA_WHEEL_DIR="${VSA_WHEEL_DIR:-/tmp/vsa-wheels}"
VSA_PIP_OFFLINE="${VSA_PIP_OFFLINE:-0}"
VENV=/opt/vsa/venv

shopt -s nullglob
wheels=("$VSA_WHEEL_DIR"/vsa_appliance-*.whl)
if ((${#wheels[@]} != 1)); then
  echo "expected exactly one vsa_appliance wheel in $VSA_WHEEL_DIR, found ${#wheels[@]}" >&2
  exit 1
fi

python3 -m venv "$VENV"
pip_args=(--no-cache-dir --disable-pip-version-check --find-links "$VSA_WHEEL_DIR")
if [[ "$VSA_PIP_OFFLINE" == 1 ]]; then
  pip_args+=(--no-index)
fi
"$VENV/bin/pip" install "${pip_args[@]}" "${wheels[0]}"

# Root owns the code; the service user only runs it.
chown -R root:root /opt/vsa
chmod -R go-w /opt/vsa
"$VENV/bin/vsa" --version
