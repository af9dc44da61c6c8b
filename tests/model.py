"""The pure reference model of the replication semantics: bytearrays only.

P  the primary's disk             (every primary write)
R  the replica image              (every primary write the secondary received)
C  the view at the last checkpoint; V = C plus the secondary VM's own writes
"""


class PairModel:
    def __init__(self, size: int, initial: bytes | None = None):
        data = bytearray(initial) if initial is not None else bytearray(size)
        self.size = size
        self.primary = bytearray(data)
        self.replica = bytearray(data)
        self.view = bytearray(data)
        self.failed_over = False

    def primary_write(self, offset: int, data: bytes, replicate: bool = True) -> None:
        self.primary[offset : offset + len(data)] = data
        if replicate and not self.failed_over:
            self.replica[offset : offset + len(data)] = data

    def primary_zero(self, offset: int, length: int) -> None:
        self.primary_write(offset, bytes(length))

    def secondary_write(self, offset: int, data: bytes) -> None:
        self.view[offset : offset + len(data)] = data
        if self.failed_over:
            self.replica[offset : offset + len(data)] = data

    def checkpoint(self) -> None:
        self.view = bytearray(self.replica)

    def failover(self) -> None:
        # The view does not change; it becomes the replica.
        self.failed_over = True
        self.replica = bytearray(self.view)
