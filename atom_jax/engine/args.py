"""The engine's settings, stated once: `EngineConfig` (every field with its default, type and
help text), the command-line flags built from it (`add_engine_args`), `EngineConfig` from
parsed flags (`engine_config`), and the start-up every front end shares (`start_engine`:
single host, or a multi-host run where process 0 runs the front end and the others follow).

Adding an engine flag is one change here: a field of `EngineConfig` made with `setting(...)`;
`serve` and `generate` pick it up. Nothing here imports jax: the CLIs parse flags (and set
XLA_FLAGS) before jax starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Callable

from atom_jax.chat.plan import REASONING_PARSERS, TEMPLATES as CHAT_TEMPLATES
from atom_jax.kernels.names import ATTN_BACKENDS, MOE_BACKENDS
from atom_jax.scheduler import TBO_MIN_TOKENS
from atom_jax.scheduler.pages import default_state_pages
from atom_jax.weights.formats import AUTO, FORMATS_HELP, LAYOUT_CHOICES, LAYOUT_HELP, WEIGHT_FORMATS, resolve_layout

COMMAND_BUFFERS = ("xla", "off", "concurrent")  # --command-buffers (runner.COMMAND_BUFFER_OPTIONS: what each compiles with)

log = logging.getLogger("atom_jax.engine")


# ---- flag value types (argparse `type=`: a clear usage error, never a traceback) ---------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an int > 0, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


_TBO = {"on": True, "off": False, "auto": None}


def tbo_choice(text: str) -> bool | None:
    if text not in _TBO:
        raise argparse.ArgumentTypeError(f"expected one of on, off, auto; got {text!r}")
    return _TBO[text]


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off; got {text!r}")
    return text == "on"


def cache_dir(text: str) -> str:
    """A directory, or '' (no cache) for 'off' / 'none' / ''."""
    return "" if text.strip().lower() in ("", "off", "none") else text


# The one temperature rule of the front ends: a request (HTTP body or generate input line) that
# gives no temperature samples at 1.0, OpenAI's and vLLM's default; 0 is greedy. (The Python
# API's `SamplingParams()` is greedy unless told otherwise.)
REQUEST_DEFAULT_TEMPERATURE = 1.0


def default_cache_dir() -> str:
    """The per-user persistent compilation cache the CLIs use unless told otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "atom_jax", "xla")


def setting(default, help: str, *, type: Callable | None = None, choices=None, metavar=None,
            flag: bool = True, cli_default: Any = dataclasses.MISSING,
            show_default: str | None = None, negatable: bool = False):
    """An `EngineConfig` field and its command-line flag (`--field-name`).

    `cli_default`: the flag's default when it differs from the library's (e.g. the persistent
    compilation cache, on for the CLIs); `show_default`: how --help states the default when
    the value itself does not say it (None values); `negatable`: a bool flag given as
    --name / --no-name."""
    meta = {"help": help, "type": type, "choices": choices, "metavar": metavar, "flag": flag,
            "cli_default": cli_default, "show_default": show_default, "negatable": negatable}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class EngineConfig:
    model: str | None = setting(
        None, "model directory (an HF, DeepSeek-official or orbax checkpoint); 'random': the "
        "tiny model's shapes with random weights", show_default="the embedded tiny model "
        "trained on stdlib docstrings, byte tokenizer")
    dp: int = setting(1, "data-parallel ranks (one device each)", type=positive_int,
                      show_default="1; multi-host: every device of the run")
    dtype: str = setting("float32", "dtype of the weights and activations",
                         choices=("float32", "bfloat16", "float16"))
    weights: str = setting(
        AUTO, f"weight format on the device: {FORMATS_HELP} (the model dtype: --dtype); auto: "
        "native when the checkpoint's experts are FP4", choices=WEIGHT_FORMATS)
    expert_layout: str = setting(AUTO, LAYOUT_HELP + " (a model passed to Engine keeps its own layout "
                                 "unless this says kmajor or nmajor)", choices=LAYOUT_CHOICES)
    num_slots: int = setting(16, "sequences resident at once per rank", type=positive_int)
    num_pages: int = setting(256, "cache pages per rank", type=positive_int)
    page_tokens: int = setting(128, "positions per cache page (a multiple of the compression "
                               "ratios)", type=positive_int)
    max_model_len: int | None = setting(
        None, "longest prompt + output of one request; sizes each sequence's page table "
        "(ceil(max-model-len / page-tokens) pages). More than num-pages x page-tokens is an error",
        type=positive_int, show_default="the model's max_position_embeddings, at most num-pages x "
        "page-tokens")
    max_pages_per_seq: int | None = setting(
        None, "pages one sequence may hold (page-table width); with --max-model-len unset the "
        "context is page-tokens x this", type=positive_int, show_default="from --max-model-len")
    max_tokens_per_step: int = setting(256, "token budget of one step per rank", type=positive_int)
    chunk_size: int = setting(256, "longest prefill chunk of one sequence in a step",
                              type=positive_int)
    buckets: tuple[int, ...] | None = setting(
        None, "comma list of step token buckets (each step is padded up to one)", type=int_list,
        show_default="powers of 2 up to the step budget")
    tbo: bool | None = setting(
        None, "two-batch overlap: on, off, or auto (on for steps of >= --tbo-min-tokens per "
        "rank)", type=tbo_choice, metavar="{on,off,auto}", show_default="auto")
    tbo_min_tokens: int | None = setting(
        None, "with --tbo auto: smallest step (tokens per rank) that runs as two overlapped "
        "micro-batches", type=positive_int,
        show_default=f"this dp's crossover from atom_jax/scheduler/tbo_crossover.json (measured or "
        f"modelled; {TBO_MIN_TOKENS} where it has none)")
    delayer: str = setting("auto", "cross-rank prefill gate (auto: on for dp > 1)",
                           choices=("off", "on", "coalesce", "auto"))
    expert_mode: str = setting("expert", "how routed experts are sharded over the DP ranks",
                               flag=False)
    moe_backend: str = setting(
        "auto", "routed-expert grouped GEMM (auto: ragged_dot on CPU; on GPU tokamax for small "
        "groups on Hopper when installed, else the Pallas kernel)", choices=MOE_BACKENDS)
    attn_backend: str = setting(
        "auto", "cached attention and lightning indexer: jnp (reference) or pallas (the Triton "
        "kernels of atom_jax.kernels.sparse_*; auto: jnp on CPU, pallas on GPU)", choices=ATTN_BACKENDS)
    overlap_schedule: bool = setting(
        True, "plan and dispatch step N+1 before reading step N's tokens, so host work hides "
        "behind the device (off: the synchronous loop, for debugging)", type=on_off,
        metavar="{on,off}", show_default="on")
    dispatch_thread: bool = setting(
        False, "with the overlap schedule, launch each step (the compiled program called on "
        "its packed inputs: on GPU, the kernel launches) from a second thread while the engine "
        "thread streams the previous step and plans and packs the next", type=on_off,
        metavar="{on,off}", show_default="off")
    command_buffers: str = setting(
        "xla", "the step program's XLA GPU command buffers (CUDA graphs): xla = XLA's default "
        "set; off = none, every kernel launched on its own; concurrent = XLA's set with each graph's "
        "kernels ordered by data dependencies only (no effect on CPU)",
        choices=COMMAND_BUFFERS)
    seed: int = setting(0, "seed of random weights and of requests that give no seed", type=int)
    compilation_cache_dir: str | None = setting(
        None, "persistent XLA compilation cache, so a restart skips compiling ('off': none)",
        type=cache_dir, metavar="DIR", cli_default=default_cache_dir(),
        show_default="$XDG_CACHE_HOME/atom_jax/xla, else ~/.cache/atom_jax/xla")
    chat_template: str = setting(
        "auto", "how chat messages become the prompt: v4 is DeepSeek-V4's encoding (thinking "
        "mode, tools in DSML), tokenizer the model directory's own template; auto: the "
        "directory's template if it has one, else v4 (the embedded tiny model keeps its plain "
        "format)", choices=CHAT_TEMPLATES)
    reasoning_parser: str = setting(
        "auto", "deepseek-v4: V4's thinking goes to reasoning_content, not content (auto: on "
        "with the v4 template)", choices=REASONING_PARSERS)
    enable_prefix_caching: bool = setting(
        True, "reuse the cache pages of equal prompt prefixes (page-aligned blocks; a bounded pool "
        "of pages, --prefix-state-pages, also keeps the sliding window's rows at their end)", negatable=True,
        show_default="on")
    prefix_state_pages: int | None = setting(
        None, "pages whose sliding-window state the prefix cache keeps at once (a cached prefix "
        "is reused up to the last page that kept it; a chunk with more new pages than entries "
        "gives them to its last pages; each costs about 7x a page's compressed entries)", type=positive_int,
        show_default="4 per --num-slots, at most --num-pages")
    thinking: bool = setting(
        False, "V4 thinking mode for chat requests that do not set chat_template_kwargs."
        "thinking", type=on_off, metavar="{on,off}", show_default="off")

    def expert_layout_on(self, platform: str, weights: str | None = None) -> str:
        """The routed experts' layout of a run on `platform` (jax's backend name) of a model in
        format `weights` (default --weights; pass the resolved format where known: `auto` resolves
        the layout as for FP4 experts): the one resolution of --expert-layout
        (weights.formats.resolve_layout)."""
        return resolve_layout(self.expert_layout, platform, self.weights if weights is None else weights)

    def state_pages(self) -> int:
        """Entries of the prefix cache's window-state pool (0: prefix caching off)."""
        if not self.enable_prefix_caching:
            return 0
        if self.prefix_state_pages is not None:
            return min(self.prefix_state_pages, self.num_pages)
        return default_state_pages(self.num_slots, self.num_pages)

    def context(self, max_position_embeddings: int) -> tuple[int, int]:
        """The one context decision -> (max_model_len, pages per sequence). ValueError, naming
        the flags, when the context asked for cannot fit one rank's pages."""
        pt, fit = self.page_tokens, self.num_pages * self.page_tokens
        if self.max_model_len is not None:
            if self.max_model_len > fit:
                raise ValueError(f"--max-model-len {self.max_model_len} needs {-(-self.max_model_len // pt)} "
                                 f"pages of {pt} tokens per rank; --num-pages is {self.num_pages} "
                                 f"({fit} tokens): raise --num-pages or lower --max-model-len")
            length = self.max_model_len
        elif self.max_pages_per_seq is not None:
            length = min(self.max_pages_per_seq * pt, fit, max_position_embeddings)
        else:
            length = min(max_position_embeddings, fit)
        pages = self.max_pages_per_seq if self.max_pages_per_seq is not None else -(-length // pt)
        if pages * pt < length:
            raise ValueError(f"--max-pages-per-seq {pages} holds {pages * pt} tokens, less than "
                             f"--max-model-len {length}")
        return length, pages


_MODEL_FLAGS = ("model", "dtype", "weights", "expert_layout", "seed", "chat_template", "reasoning_parser", "thinking")
FLAG_FIELDS = tuple(f for f in dataclasses.fields(EngineConfig) if f.metadata.get("flag"))


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["show_default"] is not None:
        return meta["show_default"]
    value = meta["cli_default"] if meta["cli_default"] is not dataclasses.MISSING else f.default
    return str(value)


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per `EngineConfig` field (`exclude`: fields a front end states itself). Every
    flag's default is None: `engine_config` then takes the field's (CLI) default, so a front
    end can tell what the user set."""
    model = parser.add_argument_group("model")
    engine = parser.add_argument_group("engine (sizes are per DP rank)")
    for f in FLAG_FIELDS:
        if f.name in exclude:
            continue
        meta = f.metadata
        group = model if f.name in _MODEL_FLAGS else engine
        kw = {"default": None, "help": f"{meta['help']} (default: {_default_text(f)})"}
        if meta["type"] is not None:
            kw["type"] = meta["type"]
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kw["metavar"] = meta["metavar"]
        if meta["negatable"]:
            kw["action"] = argparse.BooleanOptionalAction
        group.add_argument(_flag_name(f.name), **kw)


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """`EngineConfig` from parsed flags: a flag left unset takes the field's CLI default."""
    values = {}
    for f in FLAG_FIELDS:
        value = getattr(args, f.name, None)
        if value is None:
            cli = f.metadata["cli_default"]
            value = f.default if cli is dataclasses.MISSING else cli
        values[f.name] = value
    values.update(overrides)
    return EngineConfig(**values)


# ---- start-up: single host, or one process per host --------------------------------------------
def prepare_jax_env(dp: int) -> None:
    """Before jax is imported: give the CPU backend `dp` devices when asked for more than one
    (harmless on GPU hosts, where it only affects the unused host platform)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if dp > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={dp}".strip()


def configure_logging(level: str = "info") -> None:
    """atom_jax's own loggers at `level`; everything else (jax's 'Unable to initialize backend
    tpu', orbax's flag probes, absl) only from WARNING up, so start-up shows what matters."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("atom_jax").setLevel(level.upper())


@dataclasses.dataclass
class EngineStart:
    """What `start_engine` decided: the engine's config and, in a multi-host run, the cluster."""

    config: EngineConfig
    cluster: Any = None  # atom_jax.distributed Cluster; None on a single host

    @property
    def is_leader(self) -> bool:
        """Runs the front end: the single host, or process 0 of a multi-host run."""
        return self.cluster is None or self.cluster.is_leader

    def build(self):
        """The Engine (every process of a multi-host run builds the same one)."""
        from atom_jax.engine.engine import Engine

        return Engine(self.config, cluster=self.cluster)

    def follow(self, engine=None) -> int:
        """A process other than 0: build the engine (unless given), run process 0's steps
        until it stops. -> the number of steps run."""
        c = self.cluster
        log.info("process %d of %d: following process 0 (dp=%d)", c.process_id,
                 c.num_processes, self.config.dp)
        if engine is None:
            self.build()
        steps = c.follow()
        log.info("process %d: process 0 stopped; exiting after %d steps", c.process_id, steps)
        return steps


def start_engine(args: argparse.Namespace, **overrides) -> EngineStart:
    """Read the multi-host flags (`atom_jax.distributed.add_distributed_args`); on a single
    host prepare jax's environment, in a multi-host run join it (dp defaults to every device
    of the run). ValueError for inconsistent multi-host settings."""
    from atom_jax.distributed import initialize, resolve

    dist = resolve(args)
    if dist is None:
        dp = getattr(args, "dp", None) or 1
        prepare_jax_env(dp)
        return EngineStart(engine_config(args, dp=dp, **overrides))
    cluster = initialize(dist)
    import jax

    dp = getattr(args, "dp", None) or jax.device_count()
    return EngineStart(engine_config(args, dp=dp, **overrides), cluster)
