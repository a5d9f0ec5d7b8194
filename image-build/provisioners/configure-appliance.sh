#!/usr/bin/env bash
# /etc/vsa/appliance.toml: what the image bakes in (the platform's URL, its CA
# if it is not a public one, the signatures key). One concern: the appliance's
# configuration. User-data (PERSCODE, PROXY_URL) is per instance, never baked.
#
# VSA_PLATFORM_URL        https://host[:port] (required)
# VSA_PLATFORM_CA_FILE    a PEM file to bake as /etc/vsa/platform-ca.pem (optional)
# VSA_PLATFORM_CA_B64     the same PEM, base64-encoded (Packer passes it so; optional)
# VSA_SIGNATURES_PUBLIC_KEY base64 raw Ed25519 key (optional)
set -o errexit -o nounset -o pipefail

: "${VSA_PLATFORM_URL:?the platform URL to bake into the image}"
VSA_PLATFORM_CA_FILE="${VSA_PLATFORM_CA_FILE:-}"
VSA_PLATFORM_CA_B64="${VSA_PLATFORM_CA_B64:-}"
VSA_SIGNATURES_PUBLIC_KEY="${VSA_SIGNATURES_PUBLIC_KEY:-}"
CONF=/etc/vsa/appliance.toml

install -d --mode=0750 --owner=root --group=vsa /etc/vsa
{
  echo "# Baked by image-build/provisioners/configure-appliance.sh."
  echo "[platform]"
  echo "url = \"$VSA_PLATFORM_URL\""
  if [[ -n "$VSA_PLATFORM_CA_B64" ]]; then
    base64 --decode <<<"$VSA_PLATFORM_CA_B64" > /etc/vsa/platform-ca.pem
  elif [[ -n "$VSA_PLATFORM_CA_FILE" ]]; then
    cp "$VSA_PLATFORM_CA_FILE" /etc/vsa/platform-ca.pem
  fi
  if [[ -f /etc/vsa/platform-ca.pem ]]; then
    chown root:vsa /etc/vsa/platform-ca.pem
    chmod 0640 /etc/vsa/platform-ca.pem
    grep -q 'BEGIN CERTIFICATE' /etc/vsa/platform-ca.pem
    echo "ca_file = \"/etc/vsa/platform-ca.pem\""
  fi
  if [[ -n "$VSA_SIGNATURES_PUBLIC_KEY" ]]; then
    echo
    echo "[signatures]"
    echo "public_key = \"$VSA_SIGNATURES_PUBLIC_KEY\""
  fi
} > "$CONF.tmp"
chown root:vsa "$CONF.tmp"
chmod 0640 "$CONF.tmp"
mv "$CONF.tmp" "$CONF"
echo "baked $CONF (platform $VSA_PLATFORM_URL)"
