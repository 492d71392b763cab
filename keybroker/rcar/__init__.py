"""Trustee's KBS RCAR protocol: the shared wire contract and the guest's client."""
