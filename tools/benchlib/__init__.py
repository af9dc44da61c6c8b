"""Helpers for tools/bench.py: targets (plain file, repdisk pair, QEMU pair), fio, report."""
