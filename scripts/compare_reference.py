"""`python scripts/compare_reference.py --flags` = `protoad compare-reference --flags` (installed with the package).

What it does, its flags and what it prints: protoad_jax/commands/compare_reference.py (or --help).
"""

from protoad_jax import cli

if __name__ == "__main__":
    cli.run("compare-reference")
