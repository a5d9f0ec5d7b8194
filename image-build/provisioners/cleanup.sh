#!/usr/bin/env bash
# Generalize the image so that every instance starts fresh: no host keys, no
# machine-id, no cloud-init state, no logs, no appliance state, no build
# leftovers. One concern: generalization. validate.sh proves the result.
# After amazon-eks-ami's templates/shared/provisioners/cleanup.sh.
set -o errexit -o nounset -o pipefail

# A live build instance (Packer) runs systemd; the local build is a chroot.
live=0
[[ -d /run/systemd/system ]] && live=1

# Package caches and lists: stale on the first boot anyway.
apt-get clean
rm -rf /var/lib/apt/lists/*
rm -rf /root/.cache /opt/vsa/venv/.cache

# Build leftovers: the uploaded wheels and units.
rm -rf /tmp/vsa-wheels /tmp/vsa-systemd /tmp/vsa-provisioners

# SSH host keys: regenerated at first boot (cloud-init, or sshd's
# ssh-keygen -A), so no two instances share them.
rm -f /etc/ssh/ssh_host_*
# Keys that reached the build (Packer's temporary key pair, an admin's).
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys

# machine-id: empty, not absent, so systemd generates a new one at first boot
# and treats the boot as the first (ConditionFirstBoot=), see machine-id(5).
truncate --size=0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
# Per-machine secrets systemd derives or stores.
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret

# cloud-init: forget this instance so the next boot runs every module again.
if command -v cloud-init >/dev/null 2>&1; then
  cloud-init clean --logs --seed
fi
rm -rf /var/lib/cloud/instance /var/lib/cloud/instances /var/lib/cloud/data /var/lib/cloud/sem

# DHCP leases of the build instance.
rm -rf /var/lib/dhcp/* /var/lib/systemd/network/* 2>/dev/null || true

# The appliance's state (identity, key, spool, signatures): a build must never
# ship a registered identity (every instance would be a clone).
if [[ -d /var/lib/vsa ]]; then
  find /var/lib/vsa -mindepth 1 -delete
fi
rm -rf /var/lib/private/vsa /var/cache/vsa /run/vsa

# Logs. On a live instance journald is writing: stop it (and its sockets, so
# it is not re-activated) for the last seconds of the build.
if ((live)); then
  systemctl stop systemd-journald.socket systemd-journald-dev-log.socket \
    systemd-journald-audit.socket systemd-journald.service 2>/dev/null || true
fi
if [[ -d /var/log/journal ]]; then
  find /var/log/journal -mindepth 1 -delete
fi
# Truncate rather than delete files that packages expect to exist (wtmp, btmp,
# lastlog, dpkg.log); delete rotated copies.
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find /var/log -type f -exec truncate --size=0 {} +

# Shell history and temporary files of the build.
rm -f /root/.bash_history /home/*/.bash_history
find /tmp /var/tmp -mindepth 1 -maxdepth 1 ! -name 'script_*.sh' -exec rm -rf {} +

# Nobody logs in with a password: lock root's.
usermod --lock root
echo "cleanup: done"
