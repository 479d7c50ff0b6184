"""Benchmarks: scripts that measure speed, memory and accuracy and print a table.

Each module runs as ``python -m autoround.bench.<name> --help``. Targets live here, never in timed test
assertions; measured results are recorded in docs/benchmarks.md with the command that produced them.
"""
