"""`python -m atom_jax.serve`: see atom_jax/serve/cli.py."""

import sys

from atom_jax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
