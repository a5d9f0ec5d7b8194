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
# Debian's sshd_config includes sshd_config.d/*.conf first, and the first value wins.
grep -q '^Include /etc/ssh/sshd_config.d/\*.conf' /etc/ssh/sshd_config
# Check the resulting configuration without host keys (cleanup.sh removes them;
# they are generated at first boot): -T needs at least one, so use a throw-away one.
tmpkey="$(mktemp -d)"
trap 'rm -rf "$tmpkey"' EXIT
ssh-keygen -q -t ed25519 -N '' -f "$tmpkey/key"
effective="$(/usr/sbin/sshd -T -h "$tmpkey/key" -C user=root,host=localhost,addr=127.0.0.1)"
grep -qx 'passwordauthentication no' <<<"$effective"
grep -qx 'kbdinteractiveauthentication no' <<<"$effective"
echo "sshd: password authentication off"
