# Packer and plugin versions for `packer init image-build/`. Kept apart from
# vsa.pkr.hcl because Debian 12's packer 1.6.6 knows no required_plugins block.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      version = ">= 1.1.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
