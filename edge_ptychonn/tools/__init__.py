"""Tools around the live path: starting and watching real PvaPy processes, the
demo and the benchmarks."""
