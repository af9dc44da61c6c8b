"""repdisk: a replicated virtual disk (COLO-style block replication) over FUSE and NBD."""

__version__ = "0.1.0"
