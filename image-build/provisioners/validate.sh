#!/usr/bin/env bash
# Prove that cleanup.sh generalized the image: no SSH host keys, an empty
# machine-id, no cloud-init instance state, no logs, no appliance state, and
# the appliance installed and enabled. Exits 1 listing every failure.
# After amazon-eks-ami's templates/shared/provisioners/validate.sh.
set -o errexit -o nounset -o pipefail

failures=0
fail() { echo "validate: FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "validate: ok: $*"; }

check_absent_glob() {  # $1: description, rest: paths (unexpanded globs are absent)
  local what="$1"; shift
  local found=()
  local path
  for path in "$@"; do
    [[ -e "$path" || -L "$path" ]] && found+=("$path")
  done
  if ((${#found[@]})); then fail "$what: ${found[*]}"; else ok "$what: none"; fi
}

shopt -s nullglob
check_absent_glob "SSH host keys" /etc/ssh/ssh_host_*
check_absent_glob "authorized_keys" /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
check_absent_glob "cloud-init instance state" /var/lib/cloud/instance /var/lib/cloud/instances/* \
  /var/lib/cloud/data /var/lib/cloud/sem
check_absent_glob "cloud-init logs" /var/log/cloud-init.log /var/log/cloud-init-output.log
check_absent_glob "D-Bus machine-id copy" /var/lib/dbus/machine-id
check_absent_glob "systemd random seed and credential secret" /var/lib/systemd/random-seed \
  /var/lib/systemd/credential.secret
check_absent_glob "apt lists" /var/lib/apt/lists/*_Packages /var/lib/apt/lists/*_InRelease
check_absent_glob "build uploads" /tmp/vsa-wheels /tmp/vsa-systemd /tmp/vsa-provisioners
shopt -u nullglob

if [[ -f /etc/machine-id && ! -s /etc/machine-id ]]; then
  ok "machine-id: present and empty (generated at first boot)"
else
  fail "machine-id: must exist and be empty"
fi

journal="$(find /var/log/journal -type f 2>/dev/null | head -n 5)"
[[ -z "$journal" ]] && ok "journal files: none" || fail "journal files: $journal"
logs="$(find /var/log -type f -size +0c 2>/dev/null | head -n 5)"
[[ -z "$logs" ]] && ok "non-empty logs: none" || fail "non-empty logs: $logs"

if [[ -d /var/lib/vsa ]] && [[ -n "$(find /var/lib/vsa -mindepth 1 2>/dev/null | head -n 1)" ]]; then
  fail "appliance state left in /var/lib/vsa: $(find /var/lib/vsa -mindepth 1 | head -n 5 | tr '\n' ' ')"
else
  ok "appliance state: none"
fi

# What must be there.
[[ -x /opt/vsa/venv/bin/vsa ]] && ok "appliance: /opt/vsa/venv/bin/vsa" || fail "appliance not installed in /opt/vsa/venv"
[[ -L /etc/systemd/system/multi-user.target.wants/vsa.service ]] && ok "vsa.service enabled" \
  || fail "vsa.service is not enabled"
getent passwd vsa >/dev/null && ok "system user vsa" || fail "no system user vsa"
grep -qs 'console=ttyS0' /etc/default/grub.d/90-vsa-console.cfg && ok "serial console configured" \
  || fail "serial console not configured"
grep -qsx 'PasswordAuthentication no' /etc/ssh/sshd_config.d/50-vsa.conf && ok "SSH passwords off" \
  || fail "SSH password authentication not disabled"
passwd --status root | awk '{exit ($2 == "L") ? 0 : 1}' && ok "root password locked" \
  || fail "root password not locked"

if ((failures)); then
  echo "validate: $failures check(s) failed" >&2
  exit 1
fi
echo "validate: the image is generalized"
