"""The engine flags, stated once in `atom_jax.engine.args`: both CLIs expose the same ones, every
option's --help states its default, flags map onto EngineConfig, and parsing needs no jax."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from atom_jax.engine.args import FLAG_FIELDS, EngineConfig, engine_config
from atom_jax.generate.cli import build_parser as generate_parser
from atom_jax.serve.cli import build_parser as serve_parser

GEN_REQUIRED = ["--input", "i", "--output", "o"]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


def _all_options(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.Action]:
    """Options and positionals of a parser and its subcommands, named `sub --flag`."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(_all_options(sub, f"{prefix}{name} "))
        elif not isinstance(a, argparse._HelpAction) and (a.option_strings or a.nargs == "?"):
            out[prefix + (a.option_strings[-1] if a.option_strings else a.dest)] = a
    return out


def _trace_parser():
    from atom_jax.trace.__main__ import build_parser

    return build_parser()


def _demo_parser():
    from atom_jax.demo import build_parser

    return build_parser()


@pytest.mark.parametrize("parser", [serve_parser, generate_parser, _trace_parser, _demo_parser])
def test_help_states_a_default_for_every_option(parser):
    missing = [name for name, a in _all_options(parser()).items()
               if not a.help or "default" not in a.help and "required" not in a.help]
    assert not missing, f"options without a stated default: {missing}"


def test_both_clis_expose_every_engine_flag():
    flags = {"--" + f.name.replace("_", "-") for f in FLAG_FIELDS}
    for parser in (serve_parser(), generate_parser()):
        assert flags <= {s for a in parser._actions for s in a.option_strings}


def test_unset_flags_give_the_config_defaults_and_set_ones_map_onto_fields():
    cfg = engine_config(serve_parser().parse_args([]))
    # The CLIs keep a persistent compilation cache (a per-user directory); the library does not.
    assert cfg.compilation_cache_dir and EngineConfig().compilation_cache_dir is None
    assert dataclasses.replace(cfg, compilation_cache_dir=None) == EngineConfig()
    args = generate_parser().parse_args(GEN_REQUIRED + [
        "--tbo", "off", "--buckets", "8,16", "--num-slots", "3", "--dp", "2", "--seed", "7",
        "--compilation-cache-dir", "off", "--dtype", "bfloat16"])
    cfg = engine_config(args, seed=args.seed)
    assert (cfg.tbo, cfg.buckets, cfg.num_slots, cfg.dp, cfg.seed, cfg.compilation_cache_dir,
            cfg.dtype) == (False, (8, 16), 3, 2, 7, "", "bfloat16")
    assert engine_config(serve_parser().parse_args(["--tbo", "on"])).tbo is True
    assert engine_config(serve_parser().parse_args([])).enable_prefix_caching is True
    assert engine_config(serve_parser().parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching is False


def test_expert_layout_flag_resolves_by_platform(monkeypatch):
    """--expert-layout: auto is kmajor on a GPU, nmajor on CPU, for FP4 experts (and `auto`
    weights); for bf16 experts auto is kmajor on a GPU only where BF16_KMAJOR_ON_GPU; an explicit
    choice stays, for either format."""
    from atom_jax.weights import formats

    assert engine_config(serve_parser().parse_args([])).expert_layout == "auto"
    for argv, cpu, gpu in (([], "nmajor", "kmajor"), (["--expert-layout", "nmajor"], "nmajor", "nmajor"),
                           (["--expert-layout", "kmajor"], "kmajor", "kmajor")):
        cfg = engine_config(generate_parser().parse_args(GEN_REQUIRED + argv))
        assert (cfg.expert_layout_on("cpu"), cfg.expert_layout_on("gpu")) == (cpu, gpu)
        assert cfg.expert_layout_on("gpu", "native") == gpu
        bf16 = "nmajor" if not argv else gpu
        assert (cfg.expert_layout_on("cpu", "bf16"), cfg.expert_layout_on("gpu", "bf16")) == (cpu, bf16)
    monkeypatch.setattr(formats, "BF16_KMAJOR_ON_GPU", True)  # the one constant that flips it
    cfg = engine_config(generate_parser().parse_args(GEN_REQUIRED))
    assert (cfg.expert_layout_on("cpu", "bf16"), cfg.expert_layout_on("gpu", "bf16")) == ("nmajor", "kmajor")


@pytest.mark.parametrize("argv", [["--num-slots", "0"], ["--buckets", "8,x"], ["--tbo", "maybe"],
                                  ["--dtype", "int3"], ["--expert-layout", "rowmajor"]])
def test_bad_engine_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        serve_parser().parse_args(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_parsing_flags_imports_no_jax():
    code = ("import sys; from atom_jax.serve.cli import build_parser as s; "
            "from atom_jax.generate.cli import build_parser as g; "
            "from atom_jax.engine.args import engine_config; "
            "engine_config(s().parse_args([])); g().parse_args(['--input', 'i', '--output', 'o']); "
            "assert 'jax' not in sys.modules, 'jax was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_max_model_len_sizes_the_page_table_and_is_bounded_by_the_pages():
    """--max-model-len: default the model's max_position_embeddings bounded by the pages that
    fit; the page table is sized from it; one that cannot fit names both flags."""
    base = dict(num_pages=8192, page_tokens=256)
    assert EngineConfig(**base).context(1 << 20) == (1 << 20, 4096)  # 1M: 2M tokens of pages fit
    assert EngineConfig(num_pages=64, page_tokens=128).context(1 << 20) == (8192, 64)  # bounded by pages
    assert EngineConfig(**base, max_model_len=5000).context(1 << 20) == (5000, 20)
    assert EngineConfig(**base, max_pages_per_seq=10).context(1 << 20) == (2560, 10)
    with pytest.raises(ValueError, match="--max-model-len 300000 needs 2344 pages.*--num-pages is 1000"):
        EngineConfig(num_pages=1000, page_tokens=128, max_model_len=300000).context(1 << 20)
    args = serve_parser().parse_args(["--max-model-len", "4000"])
    assert engine_config(args).max_model_len == 4000


@pytest.mark.parametrize("argv", [["sim", "--dp", "0"], ["sim", "--num-slots", "-1"]])
def test_bench_sim_bad_sizes_are_usage_errors(argv, capsys):
    from atom_jax.bench.__main__ import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(argv)
    assert e.value.code == 2 and "expected an int > 0" in capsys.readouterr().err


def test_startup_logging_shows_atom_jax_and_hides_backend_probes(monkeypatch):
    """serve --log-level info: atom_jax's lines at INFO; jax's probe of absent backends
    ('Unable to initialize backend tpu') and orbax's flag lookups, logged at INFO, stay hidden."""
    import logging

    from atom_jax.engine.args import configure_logging

    root, ours = logging.getLogger(), logging.getLogger("atom_jax")
    monkeypatch.setattr(root, "level", root.level)  # restored after the test
    monkeypatch.setattr(ours, "level", ours.level)
    root.setLevel(logging.INFO)  # as a host application (or an old basicConfig) might leave it
    configure_logging("info")
    assert logging.getLogger("atom_jax.serve").isEnabledFor(logging.INFO)
    for noisy in ("jax._src.xla_bridge", "absl", "orbax"):
        assert not logging.getLogger(noisy).isEnabledFor(logging.INFO), noisy
