"""Benchmarks: mmexec against ProcessPoolExecutor, loky and joblib (``python -m bench``)."""
