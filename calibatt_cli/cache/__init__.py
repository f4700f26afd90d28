"""The kernel cache `calibatt compile` writes and `generate` reads.

build.py builds a cache (tuning on a GPU with tune.py) and swaps it into place under a lock; load.py
validates and reads one, and prewarms its kernels; blocks.py builds and serves the compiled transformer
blocks and counts inductor's work; aot.py points Triton at a cache's folder, counts compilations, and
cross-compiles the kernels for another architecture (`--target`).
"""
