"""Run `python -m atom_jax.bench ...` with module attributes of atom_jax replaced, for same-machine A/B runs of a
default before it is changed in code (with_tiles.py does this for MID_TILES' specs):

    python scripts/gpu/with_attrs.py kernels.topk_select.COMPACT_W=512 -- long-context --prompts 131072 ...

Each NAME=VALUE names a module under atom_jax and one of its attributes; VALUE is a Python literal
(int, float, bool, None, tuple, str)."""
import ast
import importlib
import sys

from atom_jax.bench.__main__ import main

sep = sys.argv.index("--")
for spec in sys.argv[1:sep]:
    path, value = spec.split("=", 1)
    module, attr = path.rsplit(".", 1)
    mod = importlib.import_module(f"atom_jax.{module}")
    if not hasattr(mod, attr):
        raise SystemExit(f"atom_jax.{module} has no attribute {attr!r}")
    setattr(mod, attr, ast.literal_eval(value))
    print(f"atom_jax.{module}.{attr} = {getattr(mod, attr)!r}", flush=True)
sys.exit(main(sys.argv[sep + 1:]))
