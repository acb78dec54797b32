"""effikern's benchmark suite; ships as ``effikern.benchmarks`` and runs through ``python -m effikern bench``."""
