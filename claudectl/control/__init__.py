"""The local control channel: AMP over a UNIX socket only the owner can use."""
