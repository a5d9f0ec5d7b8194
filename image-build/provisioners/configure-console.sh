#!/usr/bin/env bash
# The kernel console on the first serial port: the operator's only window on
# EC2 is "Get system log" / the EC2 serial console, and the appliance prints
# its status lines there (StandardOutput=journal+console). One concern: console.
set -o errexit -o nounset -o pipefail

# A drop-in read by Debian's /etc/default/grub (it sources grub.d/*.cfg),
# appended last so it wins over the cloud image's own settings.
install -d /etc/default/grub.d
cat > /etc/default/grub.d/90-vsa-console.cfg <<'CFG'
# vsa: kernel and systemd messages on the serial console (EC2 system log).
GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX console=tty0 console=ttyS0,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
CFG

# The local qemu build boots with -kernel and has no boot loader installed.
if command -v update-grub >/dev/null 2>&1 && [[ -d /boot/grub ]]; then
  update-grub
else
  echo "no GRUB in this image: the kernel command line is set by the boot loader (console=ttyS0)"
fi
# A login prompt on the serial console is deliberately not enabled: the
# appliance has no interactive users; systemd starts serial-getty only if
# the kernel console is there, and the root account is locked (cleanup.sh).
