#!/usr/bin/env bash
# The systemd units: the service, its system user and its directories.
# One concern: units. Works in a chroot (no running systemd needed).
set -o errexit -o nounset -o pipefail

VSA_UNIT_DIR="${VSA_UNIT_DIR:-/tmp/vsa-systemd}"

install -D --mode=0644 "$VSA_UNIT_DIR/vsa.service" /etc/systemd/system/vsa.service
install -D --mode=0644 "$VSA_UNIT_DIR/vsa.sysusers" /usr/lib/sysusers.d/vsa.conf
install -D --mode=0644 "$VSA_UNIT_DIR/vsa.tmpfiles" /usr/lib/tmpfiles.d/vsa.conf

# Create the user and the directories now, so the image is complete without
# depending on first-boot ordering (both are idempotent at every boot anyway).
systemd-sysusers /usr/lib/sysusers.d/vsa.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/vsa.conf

# systemctl enable works offline: it only creates the WantedBy= symlink.
systemctl enable vsa.service
# The unit orders itself after network-online.target; make that target mean something.
if systemctl list-unit-files systemd-networkd-wait-online.service >/dev/null 2>&1 \
   && systemctl is-enabled --quiet systemd-networkd.service 2>/dev/null; then
  systemctl enable systemd-networkd-wait-online.service
fi
