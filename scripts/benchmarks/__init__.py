"""The measurements of scripts/benchmark.py, one file each, over a shared harness."""
