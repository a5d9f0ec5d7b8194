#!/usr/bin/env bash
# The local (qemu) image's network: systemd-networkd with a static address in
# the lab's slirp network 169.254.0.0/16 (see boot-test: the metadata address
# 169.254.169.254 must lie inside slirp's network for a guestfwd rule). The AMI
# keeps Debian's cloud networking instead. One concern: the lab network.
set -o errexit -o nounset -o pipefail

install -d /etc/systemd/network
cat > /etc/systemd/network/20-vsa-lab.network <<'CFG'
# vsa lab boot: qemu user-mode network, restrict=on (only guestfwd endpoints).
[Match]
Name=en* eth*

[Network]
Address=169.254.0.15/16
Gateway=169.254.0.2
LinkLocalAddressing=no
IPv6AcceptRA=no
CFG
systemctl enable systemd-networkd.service
echo vsa-appliance > /etc/hostname
cat > /etc/fstab <<'CFG'
# The local image: one ext4 root on the first virtio disk.
/dev/vda / ext4 defaults,errors=remount-ro 0 1
CFG
