"""The GPU extras install plugins that match the installed jax: through jax's own extras,
which pin the plugin to jax's exact version (a bare plugin name would float ahead of jax)."""

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_gpu_extras_are_jax_extras_pinned_to_the_jax_version():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda13]"] and extras["rocm"] == ["jax[rocm7-local]"]
    assert not [r for name in ("cuda", "rocm") for r in extras[name] if "plugin" in r or "pjrt" in r]
