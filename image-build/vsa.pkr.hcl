# The virtual scanner appliance AMI: Debian 12 (bookworm), x86_64, EBS-backed.
#
#   .venv/bin/pip wheel --wheel-dir OUT .     # the appliance wheel (+ dependencies)
#   packer init image-build/
#   packer build -var wheel_dir=$PWD/OUT -var platform_url=https://platform.example image-build/
#
# Every provisioning step is a plain shell script in provisioners/, one concern
# each, shared with the local build (image-build/local-build). Layout after
# awslabs/amazon-eks-ami (templates/, provisioners/*.sh, cleanup.sh then validate.sh).
#
# Building needs Packer >= 1.7 with the Amazon plugin >= 1.1.0 (versions.pkr.hcl;
# `packer init image-build/ && packer build image-build/`): `imds_support` and
# `metadata_options` are unknown to older builders. Debian 12's packer 1.6.6
# validates this file alone with -syntax-only, and in full without those two
# settings; see tests/integration/test_image_packer.py.

variable "region" {
  type        = string
  default     = "eu-west-1"
  description = "Region the AMI is built and registered in."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Build instance type (x86_64, Nitro: the serial console and IMDSv2 need Nitro)."
}

variable "wheel_dir" {
  type        = string
  default     = "out/wheelhouse"
  description = "Directory holding vsa_appliance-*.whl and its dependencies' wheels (pip wheel --wheel-dir DIR .)."
}

variable "platform_url" {
  type        = string
  default     = "https://platform.example.com"
  description = "The platform's base URL baked into /etc/vsa/appliance.toml."
}

variable "platform_ca_pem_b64" {
  type        = string
  default     = ""
  description = "Base64 of a PEM CA bundle to bake for the platform (base64 -w0 ca.pem); empty: the system trust store."
}

variable "signatures_public_key" {
  type        = string
  default     = ""
  description = "Base64 Ed25519 public key that signs knowledge-base bundles."
}

variable "ami_name_prefix" {
  type    = string
  default = "vsa-appliance"
}

locals {
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
}

source "amazon-ebs" "vsa" {
  region          = var.region
  instance_type   = var.instance_type
  ami_name        = "${var.ami_name_prefix}-debian-12-amd64-${local.timestamp}"
  ami_description = "Virtual scanner appliance on Debian 12 (bookworm), x86_64"

  # The newest official Debian 12 AMI (Debian's AWS account, see
  # https://wiki.debian.org/Cloud/AmazonEC2Image/Bookworm).
  source_ami_filter {
    owners      = ["136693071363"]
    most_recent = true
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
  }
  ssh_username = "admin"

  ena_support   = true
  sriov_support = true
  # Instances launched from the AMI default to IMDSv2 only (RegisterImage
  # ImdsSupport=v2.0): the appliance never needs IMDSv1.
  imds_support = "v2.0"
  # ... and the build instance itself requires session tokens too.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 8
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name      = "${var.ami_name_prefix}-debian-12-amd64-${local.timestamp}"
    BaseAMI   = "{{ .SourceAMI }}"
    BaseName  = "{{ .SourceAMIName }}"
    Component = "vsa-appliance"
  }
}

build {
  sources = ["source.amazon-ebs.vsa"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/vsa-wheels /tmp/vsa-systemd"]
  }

  # The appliance wheel built from this repository (and any dependency wheels).
  provisioner "file" {
    source      = "${var.wheel_dir}/"
    destination = "/tmp/vsa-wheels"
  }

  provisioner "file" {
    sources     = ["${path.root}/../systemd/vsa.service", "${path.root}/../systemd/vsa.sysusers", "${path.root}/../systemd/vsa.tmpfiles"]
    destination = "/tmp/vsa-systemd/"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "VSA_WHEEL_DIR=/tmp/vsa-wheels",
      # Reproducible: exactly the wheels built for this AMI, no index at build time.
      "VSA_PIP_OFFLINE=1",
      "VSA_UNIT_DIR=/tmp/vsa-systemd",
      "VSA_PLATFORM_URL=${var.platform_url}",
      "VSA_PLATFORM_CA_B64=${var.platform_ca_pem_b64}",
      "VSA_SIGNATURES_PUBLIC_KEY=${var.signatures_public_key}",
    ]
    scripts = [
      "${path.root}/provisioners/install-packages.sh",
      "${path.root}/provisioners/install-appliance.sh",
      "${path.root}/provisioners/install-units.sh",
      "${path.root}/provisioners/configure-appliance.sh",
      "${path.root}/provisioners/configure-console.sh",
      "${path.root}/provisioners/configure-sshd.sh",
      "${path.root}/provisioners/cleanup.sh",
      "${path.root}/provisioners/validate.sh",
    ]
  }

  post-processor "manifest" {
    output     = "manifest.json"
    strip_path = true
  }
}
