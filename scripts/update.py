"""`python scripts/update.py --flags` = `protoad update --flags` (installed with the package).

What it does, its flags and what it prints: protoad_jax/commands/update.py (or --help).
"""

from protoad_jax import cli

if __name__ == "__main__":
    cli.run("update")
