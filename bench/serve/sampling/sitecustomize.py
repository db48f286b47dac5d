"""Imported by every Python process started with this folder on PYTHONPATH (see bench.serve.sampler)."""

try:
    from bench.serve.sampler import start
except ImportError:  # the repository is not importable in this process: nothing to sample
    pass
else:
    start()
