"""Benchmarks shipped inside the package, so their commands work from an installed wheel."""
