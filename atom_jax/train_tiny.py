"""Train the embedded default model: the `tiny` DeepSeek-V4 preset (sliding, CSA and HCA
attention; hash- and score-routed MoE; ~0.4 M parameters, 1.7 MB in float32) as a byte-level
language model on the docstrings of the Python standard library's own sources, a corpus that
every machine with Python has offline.

    python -m atom_jax.train_tiny                       # the shipped model (CPU, ~15 min on 2 cores)
    python -m atom_jax.train_tiny --resume              # continue from the latest checkpoint in --work
    python -m atom_jax.train_tiny --steps 50 --out /tmp/m --plot /tmp/loss.png   # a quick try

Deterministic from --seed: the initial weights come from it and batch i is drawn by
numpy.random.default_rng([seed, i]), so a run resumed from step N (`--resume`, the optimizer
state, parameters and loss history restored by orbax) continues exactly as an uninterrupted
run would. The finished model is written with `atom_jax.loader.save_orbax` (config.json +
orbax/), plus training.json (command, seed, steps, losses, wall time) and a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax  # the `train` extra: pip install -e '.[train]'
from flax import nnx

from atom_jax.config import ModelConfig
from atom_jax.default_model import DEFAULT_MODEL_DIR, byte_model_config
from atom_jax.demo import greedy_batch
from atom_jax.loader import random_model, save_orbax
from atom_jax.models import jit_forward
from atom_jax.tokenizer import EOS_ID, ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (editable install)

DEFAULT_OUT = DEFAULT_MODEL_DIR
DEFAULT_PLOT = os.path.join(REPO, "docs", "train_tiny_loss.png")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
WORD = re.compile(r"[A-Za-z]+")


# ---- corpus -------------------------------------------------------------------------------------
def stdlib_files(root: str | None = None) -> list[str]:
    """Every .py file of the standard library (no site-packages, no test suites), sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return out


def docstrings(files: list[str]) -> list[str]:
    """Module, class and function docstrings (ast.get_docstring, cleaned), in file order."""
    docs = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    docs.append(doc.strip())
    return docs


def encode_corpus(docs: list[str]) -> np.ndarray:
    """One token stream: BOS, the docstring's UTF-8 bytes, EOS, for each docstring."""
    tok = ByteTokenizer()
    ids = []
    for doc in docs:
        ids += tok.encode(doc) + [EOS_ID]
    return np.asarray(ids, np.int32)


def corpus_words(docs: list[str], min_count: int = 2) -> set[str]:
    """The dictionary: lower-cased alphabetic words seen at least `min_count` times in the corpus."""
    counts: dict[str, int] = {}
    for doc in docs:
        for w in WORD.findall(doc):
            w = w.lower()
            counts[w] = counts.get(w, 0) + 1
    return {w for w, c in counts.items() if c >= min_count}


def word_rate(text: str, words: set[str]) -> tuple[float, int]:
    """(share of the text's alphabetic words that are in `words`, how many words it has)."""
    found = [w.lower() for w in WORD.findall(text)]
    if not found:
        return 0.0, 0
    return sum(w in words for w in found) / len(found), len(found)


def batch_at(tokens: np.ndarray, step: int, seed: int, batch: int, seq: int) -> np.ndarray:
    """Batch `step`: `batch` windows of seq + 1 tokens at positions drawn from (seed, step) alone."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    return np.stack([tokens[s: s + seq + 1] for s in starts])


# ---- model and optimizer ------------------------------------------------------------------------
def make_tx(lr: float, steps: int, warmup: int, weight_decay: float = 0.01, clip: float = 1.0):
    """AdamW, linear warm-up then cosine decay to lr / 10, global-norm clipping; weight decay on
    matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask))


def loss_fn(params, graphdef, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


_STEPS: dict[tuple, object] = {}


def train_step_fn(cfg: ModelConfig, graphdef, tx_settings: tuple):
    """The jitted step for one (model config, `make_tx` settings); one per process, so trainers
    with equal settings share its compilation (the config holds a dict, so it cannot be a
    static jit arg)."""
    key = (repr(cfg), tx_settings)
    if key not in _STEPS:
        tx = make_tx(*tx_settings)

        @jax.jit
        def step(params, rest, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, rest, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        _STEPS[key] = step
    return _STEPS[key]


class Trainer:
    """Parameters (nnx.Param), the rest of the model state (the hash router's tables) and the
    optax state, stepped by one jitted function; `save` / `restore` go through orbax."""

    def __init__(self, cfg: ModelConfig, seed: int, lr: float, steps: int, warmup: int):
        self.cfg, self.seed = cfg, seed
        self.graphdef, params, rest = nnx.split(random_model(cfg, seed=seed), nnx.Param, ...)
        tx_settings = (lr, steps, warmup)
        self.tx = make_tx(*tx_settings)
        # committed to one device, as restored arrays are, so both share one compiled step
        self.params, self.rest, self.opt_state = jax.device_put((params, rest, self.tx.init(params)),
                                                                jax.devices()[0])
        self._step = train_step_fn(cfg, self.graphdef, tx_settings)
        self.step = 0
        self.losses: list[float] = []

    def train(self, tokens: np.ndarray, n_steps: int, batch: int, seq: int, progress=None):
        for _ in range(n_steps):
            x = jnp.asarray(batch_at(tokens, self.step, self.seed, batch, seq))
            self.params, self.opt_state, loss = self._step(self.params, self.rest, self.opt_state, x)
            self.losses.append(float(loss))
            self.step += 1
            if progress is not None:
                progress(self.step, self.losses)

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)

    def _tree(self):
        return {"params": self.params, "rest": self.rest, "opt_state": self.opt_state}

    def save(self, path: str, meta: dict | None = None) -> str:
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(path, "state"), self._tree(), force=True)
        with open(os.path.join(path, "progress.json"), "w") as f:
            json.dump({"step": self.step, "seed": self.seed, "losses": self.losses, **(meta or {})}, f)
        return path

    def restore(self, path: str) -> dict:
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        with open(os.path.join(path, "progress.json")) as f:
            progress = json.load(f)
        if progress["seed"] != self.seed:
            raise SystemExit(f"{path} was trained with --seed {progress['seed']}, not {self.seed}")
        # same shapes, dtypes and shardings as this trainer's own arrays: the compiled step is reused
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self._tree())
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(os.path.join(path, "state"), abstract)
        self.params, self.rest, self.opt_state = tree["params"], tree["rest"], tree["opt_state"]
        self.step, self.losses = int(progress["step"]), list(progress["losses"])
        return progress


def latest_checkpoint(work: str) -> str | None:
    if not os.path.isdir(work):
        return None
    steps = sorted(d for d in os.listdir(work)
                   if re.fullmatch(r"step_\d+", d) and os.path.exists(os.path.join(work, d, "progress.json")))
    return os.path.join(work, steps[-1]) if steps else None


# ---- generation check and plot ------------------------------------------------------------------
def greedy_texts(model, prompts, max_tokens: int = 48) -> list[str]:
    """Greedy continuations of all `prompts` at once (each stops at EOS) through one compiled
    full-sequence forward over [len(prompts), longest prompt + max_tokens]."""
    tok = ByteTokenizer()
    outs = greedy_batch(jit_forward(model), [tok.encode(p) for p in prompts], max_tokens, eos_ids=(EOS_ID,))
    return [tok.decode(o) for o in outs]


PROMPTS = ("Return the number of ", "Create a new ", "If the file ", "This module provides ")


def ema(values, alpha=0.05):
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_losses(losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="batch loss")
    ax.plot(steps, ema(losses), color="tab:blue", lw=1.8, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Progress:
    """tqdm when installed, else a printed bar every `every` steps."""

    def __init__(self, total: int, start: int, every: int = 25):
        self.total, self.every, self.t0, self.start = total, every, time.time(), start
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", mininterval=2.0, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def __call__(self, step, losses):
        avg = float(np.mean(losses[-25:]))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{avg:.3f}", refresh=False)
        if step % self.every == 0 or step == self.total:
            rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
            if self.bar is None:
                done = int(30 * step / self.total)
                print(f"[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} loss {avg:.3f} "
                      f"{rate:.2f} step/s", flush=True)
            else:
                self.bar.write(f"step {step}/{self.total} loss {avg:.3f} ({rate:.2f} step/s)")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128, help="tokens (bytes) per training window")
    ap.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files")
    ap.add_argument("--out", default=DEFAULT_OUT, help="where the finished model goes (save_orbax layout)")
    ap.add_argument("--work", default=os.path.join(REPO, "train_tiny_run"),
                    help="training checkpoints (step_N/: orbax state + progress.json)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                    help="continue from a checkpoint directory (default: the latest in --work)")
    ap.add_argument("--plot", default=DEFAULT_PLOT, help="loss-curve PNG")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    files = stdlib_files()[: args.max_files]
    docs = docstrings(files)
    tokens = encode_corpus(docs)
    print(f"corpus: {len(docs)} docstrings from {len(files)} stdlib files "
          f"({sysconfig.get_paths()['stdlib']}), {len(tokens)} tokens", flush=True)
    cfg = byte_model_config()
    trainer = Trainer(cfg, args.seed, args.lr, args.steps, args.warmup)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(trainer.params))
    print(f"model: tiny DeepSeek-V4, {n_params} parameters, layers {cfg.attn_kinds}, "
          f"hash routing {cfg.hash_layers}", flush=True)
    meta = {k: getattr(args, k) for k in ("steps", "batch", "seq", "lr", "warmup", "max_files")}
    prior_s = 0.0
    if args.resume:
        path = latest_checkpoint(args.work) if args.resume == "latest" else args.resume
        if path is None:
            raise SystemExit(f"--resume: no checkpoint in {args.work}")
        progress = trainer.restore(path)
        changed = {k: (progress.get(k), v) for k, v in meta.items() if progress.get(k) != v}
        if changed:
            print(f"warning: settings differ from the checkpoint's: {changed}", flush=True)
        prior_s = float(progress.get("train_s", 0.0))
        print(f"resumed from {path} at step {trainer.step}", flush=True)
    bar = Progress(args.steps, trainer.step)
    t_train = time.time()
    try:
        while trainer.step < args.steps:
            n = min(args.save_every - trainer.step % args.save_every, args.steps - trainer.step)
            trainer.train(tokens, n, args.batch, args.seq, bar)
            trainer.save(os.path.join(args.work, f"step_{trainer.step:06d}"),
                         {**meta, "train_s": prior_s + time.time() - t_train})
    finally:
        bar.close()
    train_s = prior_s + time.time() - t_train
    losses = trainer.losses
    model = trainer.model()
    out = save_orbax(model, args.out)
    words = corpus_words(docs)
    samples = {}
    for p, text in zip(PROMPTS, greedy_texts(model, PROMPTS)):
        rate, n = word_rate(text, words)
        samples[p] = {"text": text, "word_rate": rate, "words": n}
        print(f"  {p!r} -> {text!r}  (dictionary words {rate:.0%} of {n})", flush=True)
    info = {
        "command": "python -m atom_jax.train_tiny " + " ".join(argv if argv is not None else sys.argv[1:]),
        **meta, "seed": args.seed, "python": sys.version.split()[0], "jax": jax.__version__,
        "corpus_docstrings": len(docs), "corpus_tokens": int(len(tokens)), "parameters": n_params,
        "train_seconds": round(train_s, 1), "first_loss": losses[0] if losses else None,
        "final_loss_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
        "samples": samples,
    }
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    if args.plot and losses:
        plot_losses(losses, args.plot, f"tiny DeepSeek-V4 on stdlib docstrings (seed {args.seed}, "
                    f"batch {args.batch}x{args.seq}, {train_s / 60:.1f} min {jax.default_backend().upper()})")
    print(f"done: {len(losses)} steps, loss {losses[0]:.3f} -> {info['final_loss_mean_last_50']:.3f} "
          f"(mean of last 50), training {train_s:.0f} s, total {time.time() - t_start:.0f} s; "
          f"model in {out}, plot in {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
