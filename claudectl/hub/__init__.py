"""The NAT hub: a byte-forwarding rendezvous for peers that cannot reach each other (docs/hub.md)."""
