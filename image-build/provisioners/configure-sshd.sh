#!/usr/bin/env bash
# SSH: keys only, no passwords, no root login with a password. One concern: sshd.
set -o errexit -o nounset -o pipefail

install -d /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/50-vsa.conf <<'CFG'
# vsa: key-based SSH only (EC2 key pair via cloud-init).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PermitEmptyPasswords no
CFG
# Host keys are removed from the image (cleanup.sh): cloud-init creates new
# ones on EC2; where it does not run, sshd's unit creates them before its own
# configuration test (which fails without keys). ExecStartPre= resets the list.
install -d /etc/systemd/system/ssh.service.d
cat > /etc/systemd/system/ssh.service.d/50-vsa-hostkeys.conf <<'CFG'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
CFG
# Debian's sshd_config includes sshd_config.d/*.conf first, and the first value wins.
grep -q '^Include /etc/ssh/sshd_config.d/\*.conf' /etc/ssh/sshd_config
# Check the resulting configuration without host keys (cleanup.sh removes them;
# they are generated at first boot): -T needs at least one, so use a throw-away one.
tmpkey="$(mktemp -d)"
made_run_sshd=0
if [[ ! -d /run/sshd ]]; then  # sshd -T insists on its privilege separation directory
  mkdir -p /run/sshd
  # shellcheck disable=SC2034  # read by the EXIT trap
  made_run_sshd=1
fi
trap 'rm -rf "$tmpkey"; if ((made_run_sshd)); then rmdir /run/sshd; fi' EXIT
ssh-keygen -q -t ed25519 -N '' -f "$tmpkey/key"
effective="$(/usr/sbin/sshd -T -h "$tmpkey/key" -C user=root,host=localhost,addr=127.0.0.1)"
grep -qx 'passwordauthentication no' <<<"$effective"
grep -qx 'kbdinteractiveauthentication no' <<<"$effective"
echo "sshd: password authentication off"
