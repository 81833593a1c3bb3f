"""`python scripts/convert_weights.py --flags` = `protoad convert-weights --flags` (installed with the package).

What it does, its flags and what it prints: protoad_jax/commands/convert_weights.py (or --help).
"""

from protoad_jax import cli

if __name__ == "__main__":
    cli.run("convert-weights")
