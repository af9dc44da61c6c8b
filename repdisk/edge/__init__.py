"""Thin adapters at the edges: FUSE front end, NBD wire and server, libnbd replica link."""
