"""The virtual scanner appliance (vsa): an EC2-resident scanner driven by a platform."""

__version__ = "0.1.0"
