"""keybroker: attested key release into the Linux kernel keyring for confidential VMs."""

__version__ = "0.1.0"
