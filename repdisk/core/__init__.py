"""The pure block core: synchronous, no trio, pyfuse3 or nbd imports.

geometry  block math (head/body/tail of unaligned ranges)
bitmap    block bitmaps as bitarray runs
image     positional I/O on a raw file
overlay   a sparse layer with an allocation bitmap
stack     the secondary's view (active -> hidden -> replica), copy-before-write, commit
errors    every error the core raises, each with its errno
"""
