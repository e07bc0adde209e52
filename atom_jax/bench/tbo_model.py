"""A calibrated step model for two-batch overlap (TBO): base and TBO time per layer as a function
of dp, tokens per rank, model dimensions and link bandwidth, fitted from measured times.

Inputs: `python -m atom_jax.bench dp-step --json F` outputs (real and `--emulate-dp` runs;
`calibration_from_dp_step` derives the components from each row), or calibration JSON
(`CALIBRATION_KIND`) holding, per layer and per rank, on the benchmark's own GPU:
- `attention`: the attention half of a layer on T tokens (norms, projections, attention, mHC
  merges, routing) plus the shared expert, no collective;
- `moe`: the routed experts on the dp * T gathered rows with E/dp local experts;
- `collectives`: one all-gather / reduce-scatter alone, with the bytes each rank receives;
- `steps`: whole steps (real or emulated dp), base and TBO, to check the model and fit one
  contention factor.

Fitted components (milliseconds, per layer and rank):
    attn(T)      = a0 + a1 * T                                  (sequences of `seq` tokens)
    ag(bytes)    = lat + bytes / BW;  rs(bytes) likewise         (bytes one rank receives)
    moe(dp, T)   = c0 + c_rows * dp * T + (E / dp) * q * max(m*, m + tile / 2)
where m = dp * T * k / E is the mean rows per local expert, q the time per row once compute
bound and q * m* the time to stream one expert's weights (below m* rows an expert costs its
weight read; `tile / 2` is the mean row padding of the kernel's row tiles). c_rows covers work
over every gathered row (sort, permute, the zero tail, the scatter back).

Step (L layers, h = T / 2 per chain, ov(x, y) = max(x, y) + gamma * min(x, y)):
    base = L * (attn(T) + ag(T) + moe(T) + rs(T))
    tbo  = attn(h) + L * (ov(ag, attn) + ov(moe, ag) + ov(rs, moe)) + (L - 1) * ov(rs, attn) + rs
         (all at h: the schedule in atom_jax/sharding; gamma = how much of the shorter of two
         overlapped ops still costs, fitted on the measured TBO steps; 0 = perfect overlap)
    fused (one expert GEMM for both chains; s = a chain's shared expert, q * h, a' = attn - s):
         a' + L * (ov(ag, a') + ov(ag, s) + moe(T) + ov(rs, s)) + (L - 1) * ov(rs, a') + rs

Other hardware: compute terms scale by published peak ratios (dense bf16 FLOP/s for the
compute-bound parts, HBM bandwidth for weight streaming), each collective's fitted bandwidth by
the ratio of the target's published per-rank receive bandwidth at that dp to the calibration
GPU's (so the measured efficiency carries over). That assumes equal efficiency on both: a
first-order prediction, labelled as such.

    python -m atom_jax.bench tbo-model --calibration flash_dp2.json flash_dp8.json pro_dp2.json ... \
        [--crossover-out F] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math

import numpy as np

from atom_jax.scheduler.tbo_policy import TBO_MIN_TOKENS

CALIBRATION_KIND = "atom_jax.tbo_calibration"

# Published figures (dense bf16 FLOP/s, HBM bytes/s, link bytes/s one rank receives per
# direction at a given dp).
#  - NVIDIA H200 SXM: 989 TFLOPS bf16 dense (1,979 with sparsity), 4.8 TB/s HBM3e, NVLink 900 GB/s
#    per GPU (both directions: 450 GB/s in) through NVSwitch, so a rank's receive bandwidth does
#    not depend on how many peers send (https://www.nvidia.com/en-us/data-center/h200/). dp 16
#    and 32 assume one NVLink domain (an NVLink-switch system); across InfiniBand nodes use
#    --link-gbps with the NIC rate (e.g. 50 for 400 Gb/s per GPU).
#  - NVIDIA H100 SXM: 989 TFLOPS bf16 dense, 3.35 TB/s, NVLink 900 GB/s.
#  - AMD Instinct MI355X: 2.5 PFLOPS fp16/bf16 dense, 8 TB/s HBM3E, 4th-gen Infinity Fabric
#    with 7 links of 153.6 GB/s (bidirectional: 76.8 GB/s in) fully connecting 8 GPUs, no switch:
#    a rank receives over min(dp - 1, 7) links at once; no scale-up beyond 8 GPUs
#    (https://www.amd.com/en/products/accelerators/instinct/mi350/mi355x.html).


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    flops: float  # dense bf16 FLOP/s
    hbm: float  # bytes/s
    link_in: float  # bytes/s a rank receives per peer link (switch: per GPU)
    switched: bool  # True: receive bandwidth independent of dp
    max_links: int = 0  # point-to-point: links per GPU
    max_dp: int | None = None  # largest dp in one scale-up domain (None: no limit modelled)

    def rank_in_bw(self, dp: int, link_gbps: float | None = None) -> float:
        if link_gbps is not None:
            return link_gbps * 1e9
        if self.switched:
            return self.link_in
        return min(dp - 1, self.max_links) * self.link_in


PLATFORMS = {
    "h200": Platform("H200 NVLink", 989e12, 4.8e12, 450e9, True),
    "h100": Platform("H100 NVLink", 989e12, 3.35e12, 450e9, True),
    "mi355x": Platform("MI355X Infinity Fabric", 2.5e15, 8.0e12, 76.8e9, False, max_links=7, max_dp=8),
}


def platform_of(device: str) -> Platform | None:
    d = device.lower()
    for key, p in PLATFORMS.items():
        if key in d:
            return p
    return None


# -- model dimensions -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Dims:
    """What the step model needs of a model's shapes."""

    name: str
    hidden: int
    experts: int
    topk: int
    inter: int
    layers: int  # full model (for whole-step predictions)
    seq: int = 1024
    act_bytes: int = 2

    @property
    def ag_row_bytes(self) -> int:  # token + routing weights (float32) + ids (int32)
        return self.hidden * self.act_bytes + self.topk * 8

    def ag_bytes(self, dp: int, tokens: int) -> float:
        return (dp - 1) * tokens * self.ag_row_bytes

    def rs_bytes(self, dp: int, tokens: int) -> float:
        return (dp - 1) * tokens * self.hidden * self.act_bytes

    @property
    def expert_weight_bytes(self) -> int:
        return 3 * self.hidden * self.inter * self.act_bytes

    @property
    def expert_flops_per_row(self) -> int:
        return 6 * self.hidden * self.inter

    @classmethod
    def from_dict(cls, d: dict) -> "Dims":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def dims_of_config(name: str, cfg, seq: int = 1024, layers: int | None = None) -> Dims:
    return Dims(name, cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                cfg.moe_intermediate_size, layers or cfg.num_layers, seq)


# -- fitting --------------------------------------------------------------------------------
def nonneg_lstsq(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares with every coefficient >= 0 (exhaustive over active sets: few columns).
    Rows are weighted by 1 / target, so the fit minimises relative error."""
    w = 1.0 / np.maximum(np.abs(target), 1e-12)
    a, b = features * w[:, None], target * w
    best, best_err = np.zeros(features.shape[1]), float(np.sum(b ** 2))
    cols = range(features.shape[1])
    for n in range(1, features.shape[1] + 1):
        for active in itertools.combinations(cols, n):
            coef, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((a[:, active] @ coef - b) ** 2))
            if err < best_err - 1e-15:
                best = np.zeros(features.shape[1])
                best[list(active)] = coef
                best_err = err
    return best, best_err


@dataclasses.dataclass(frozen=True)
class Affine:
    """t = a + b * x (milliseconds)."""

    a: float
    b: float

    def __call__(self, x: float) -> float:
        return self.a + self.b * x

    @classmethod
    def fit(cls, xs, ts) -> "Affine":
        xs, ts = np.asarray(xs, float), np.asarray(ts, float)
        coef, _ = nonneg_lstsq(np.stack([np.ones_like(xs), xs], 1), ts)
        return cls(float(coef[0]), float(coef[1]))


@dataclasses.dataclass(frozen=True)
class MoeFit:
    """moe(dp, T) = c0 + c_rows * dp * T + (E / dp) * q * max(m_star, m + tile / 2)  (ms)."""

    c0: float
    c_rows: float
    q: float  # ms per row of one expert once compute bound
    m_star: float  # rows at which an expert's compute equals its weight read
    tile: int = 128

    def __call__(self, dims: Dims, dp: int, tokens: float) -> float:
        m = dp * tokens * dims.topk / dims.experts
        per_expert = self.q * max(self.m_star, m + self.tile / 2)
        return self.c0 + self.c_rows * dp * tokens + dims.experts / dp * per_expert

    def scaled(self, dims: Dims, flop_ratio: float, hbm_ratio: float) -> "MoeFit":
        """The same kernel on a device `flop_ratio` x faster in FLOP/s and `hbm_ratio` x in
        HBM bandwidth: row work (c_rows, q) by FLOPs, weight streaming (q * m_star) by HBM."""
        q = self.q / flop_ratio
        weight_ms = self.q * self.m_star / hbm_ratio
        return MoeFit(self.c0, self.c_rows / hbm_ratio, q, weight_ms / q, self.tile)

    @classmethod
    def fit(cls, dims: Dims, points, tile: int = 128) -> "MoeFit":
        """points: (dp, tokens, ms). 1-D search over m_star (log grid, then refine); the rest
        is linear."""
        dp = np.array([p[0] for p in points], float)
        tok = np.array([p[1] for p in points], float)
        t = np.array([p[2] for p in points], float)
        m = dp * tok * dims.topk / dims.experts
        local = dims.experts / dp

        def solve(m_star):
            feats = np.stack([np.ones_like(t), dp * tok, local * np.maximum(m_star, m + tile / 2)], 1)
            coef, err = nonneg_lstsq(feats, t)
            return err, coef

        grid = np.exp(np.linspace(math.log(1.0), math.log(1e5), 121))
        errs = [solve(g)[0] for g in grid]
        i = int(np.argmin(errs))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        for _ in range(60):  # golden-section refinement in log space
            a = math.exp(math.log(lo) + 0.382 * (math.log(hi) - math.log(lo)))
            b = math.exp(math.log(lo) + 0.618 * (math.log(hi) - math.log(lo)))
            if solve(a)[0] <= solve(b)[0]:
                hi = b
            else:
                lo = a
        m_star = math.sqrt(lo * hi)
        candidates = [(solve(m_star)[0], m_star), (errs[i], grid[i])]
        m_star = min(candidates)[1]
        coef = solve(m_star)[1]
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), float(m_star), tile)


def overlap(x: float, y: float, gamma: float) -> float:
    return max(x, y) + gamma * min(x, y)


@dataclasses.dataclass(frozen=True)
class StepModel:
    """Fitted components for one model's dimensions on one device (times in ms per layer)."""

    device: str
    dims: Dims
    attn: Affine  # ms vs tokens
    moe: MoeFit
    ag: Affine  # ms vs bytes received
    rs: Affine
    gamma: float = 0.0
    link_scale: float = 1.0  # link bandwidth relative to the calibration's (other platforms, dp)

    # ---- components ------------------------------------------------------------------------
    def _comm(self, fit: Affine, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return fit.a + fit.b * nbytes / self.link_scale

    @property
    def link_GBps(self) -> float:
        """The all-gather's fitted bandwidth (bytes one rank receives per second), scaled."""
        return self.link_scale / (self.ag.b * 1e6) if self.ag.b > 0 else float("inf")

    def parts(self, dp: int, tokens: float) -> dict:
        d = self.dims
        return {"attn": self.attn(tokens), "ag": self._comm(self.ag, d.ag_bytes(dp, tokens)),
                "moe": self.moe(d, dp, tokens), "rs": self._comm(self.rs, d.rs_bytes(dp, tokens))}

    def base_ms(self, dp: int, tokens: float, layers: int) -> float:
        return layers * sum(self.parts(dp, tokens).values())

    def tbo_ms(self, dp: int, tokens: float, layers: int) -> float:
        p, g = self.parts(dp, tokens / 2), self.gamma
        per_layer = overlap(p["ag"], p["attn"], g) + overlap(p["moe"], p["ag"], g) + overlap(p["rs"], p["moe"], g)
        return p["attn"] + layers * per_layer + (layers - 1) * overlap(p["rs"], p["attn"], g) + p["rs"]

    def fused_ms(self, dp: int, tokens: float, layers: int) -> float:
        """TBO with one expert GEMM over both chains (tbo_schedule="fused"): the experts at the
        full T (weights read once), AG(B) / RS(A) hidden behind a chain's shared expert (one
        expert's compute per row, taken out of the attention half it was measured in)."""
        p, g = self.parts(dp, tokens / 2), self.gamma
        shared = min(self.moe.q * tokens / 2, p["attn"])
        rest = p["attn"] - shared
        per_layer = (overlap(p["ag"], rest, g) + overlap(p["ag"], shared, g) + self.moe(self.dims, dp, tokens)
                     + overlap(p["rs"], shared, g))
        return rest + layers * per_layer + (layers - 1) * overlap(p["rs"], rest, g) + p["rs"]

    def step_ms(self, dp: int, tokens: float, tbo: bool, layers: int | None = None) -> float:
        layers = layers or self.dims.layers
        return self.tbo_ms(dp, tokens, layers) if tbo else self.base_ms(dp, tokens, layers)

    def comm_share(self, dp: int, tokens: float) -> float:
        p = self.parts(dp, tokens)
        return (p["ag"] + p["rs"]) / sum(p.values())

    def crossover(self, dp: int, margin: float = 0.03, buckets=None) -> int | None:
        """Smallest power-of-two tokens per rank from which TBO is predicted at most (1 - margin)
        x base at this and every larger size; None if never."""
        buckets = buckets or [2 ** i for i in range(8, 18)]
        wins = [self.tbo_ms(dp, t, self.dims.layers) <= (1 - margin) * self.base_ms(dp, t, self.dims.layers)
                for t in buckets]
        for i, t in enumerate(buckets):
            if all(wins[i:]):
                return t
        return None

    # ---- other hardware ------------------------------------------------------------------
    def on(self, target: Platform, dp: int, link_gbps: float | None = None) -> "StepModel":
        """This model moved to `target` at `dp` (see the module docstring)."""
        source = platform_of(self.device)
        if source is None:
            raise ValueError(f"no published figures for calibration device {self.device!r}")
        fr, hr = target.flops / source.flops, target.hbm / source.hbm
        scale = target.rank_in_bw(dp, link_gbps) / source.rank_in_bw(2)
        return dataclasses.replace(self, device=target.name,
                                   attn=Affine(self.attn.a, self.attn.b / fr),
                                   moe=self.moe.scaled(self.dims, fr, hr), link_scale=scale)


# -- calibration files ----------------------------------------------------------------------
def load_calibrations(paths) -> list[dict]:
    """Calibration dicts from files: calibration JSON as is, and `bench dp-step --json` outputs
    (real or emulated dp) grouped by model dimensions and turned into one calibration each
    (`calibration_from_dp_step`)."""
    cals, steps = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if data.get("kind") == CALIBRATION_KIND:
            cals.append(data)
        elif "results" in data and "dims" in data:
            steps.append(data)
        else:
            raise ValueError(f"{path}: neither a TBO calibration file (kind {CALIBRATION_KIND!r}) "
                             "nor a `bench dp-step --json` output")
    groups: dict = {}
    for d in steps:
        groups.setdefault((d["dims"]["hidden_size"], d["dims"]["n_routed_experts"]), []).append(d)
    return cals + [calibration_from_dp_step(g) for g in groups.values()]


def _preset_of(dims: dict) -> tuple[str, int]:
    """(name, full layer count) of the preset with these dimensions (else the run's own)."""
    from atom_jax.config import PRESETS
    for name, make in PRESETS.items():
        cfg = make()
        if (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size) == (
                dims["hidden_size"], dims["n_routed_experts"], dims["moe_intermediate_size"]):
            return name, cfg.num_layers
    return f"d{dims['hidden_size']}", dims["num_layers"]


def calibration_from_dp_step(runs: list[dict]) -> dict:
    """`bench dp-step --json` outputs of one model's dimensions -> a calibration dict. Per prefill
    row of L layers at dp N, T tokens per rank:
    - moe: the routed experts timed alone at (N, T) and (N, T / 2);
    - collectives: the step's collectives alone / L = one all-gather + one reduce-scatter; both
      get the same fit (latency half the intercept, one bandwidth over their summed bytes);
    - attention: (base - collectives alone) / L - moe(N, T): the rest of a layer (attention half,
      shared expert, merges; the embedding and output norm spread over the layers);
    - steps: base and TBO ("split" schedule) as measured."""
    d0 = runs[0]["dims"]
    name, full_layers = _preset_of(d0)
    dims = Dims(name, d0["hidden_size"], d0["n_routed_experts"], d0["num_experts_per_tok"],
                d0["moe_intermediate_size"], full_layers, act_bytes=d0.get("dtype_bytes", 2))
    cal = {"kind": CALIBRATION_KIND, "device": runs[0]["device"], "model": dataclasses.asdict(dims),
           "attention": [], "moe": [], "comm": [], "steps": [], "from": "dp-step"}
    for run in runs:
        n, layers = run["dp"], run["layers"]
        for r in run["results"]:
            if r.get("phase") != "prefill" or "experts_ms" not in r:
                continue
            t = r["tokens_per_rank"]
            cal["moe"] += [{"dp": n, "tokens": t, "ms": r["experts_ms"]},
                           {"dp": n, "tokens": t // 2, "ms": r["experts_half_ms"]}]
            comm = r["comm_only_ms"] / layers
            cal["comm"].append({"dp": n, "tokens": t, "bytes": dims.ag_bytes(n, t) + dims.rs_bytes(n, t), "ms": comm})
            cal["attention"].append({"tokens": t, "ms": (r["base_ms"] - r["comm_only_ms"]) / layers - r["experts_ms"]})
            cal["steps"].append({"dp": n, "emulated": run.get("emulated", False), "tokens": t, "layers": layers,
                                 "base_ms": r["base_ms"], "tbo_ms": r.get("tbo_ms"), "fused_ms": r.get("fused_ms")})
    return cal


def fit_calibration(data: dict) -> StepModel:
    dims = Dims.from_dict(data["model"])
    attn = Affine.fit([p["tokens"] for p in data["attention"]], [p["ms"] for p in data["attention"]])
    moe = MoeFit.fit(dims, [(p["dp"], p["tokens"], p["ms"]) for p in data["moe"]],
                     tile=data.get("tile_rows", 128))
    fits = {}
    if data.get("comm"):  # AG + RS timed together (from dp-step): one link fit for both
        both = Affine.fit([p["bytes"] for p in data["comm"]], [p["ms"] for p in data["comm"]])
        fits["all_gather"] = fits["reduce_scatter"] = Affine(both.a / 2, both.b)
    for op in ("all_gather", "reduce_scatter"):
        pts = [p for p in data.get("collectives", []) if p["op"] == op]
        if pts:
            fits[op] = Affine.fit([p["bytes"] for p in pts], [p["ms"] for p in pts])
    model = StepModel(data.get("device", "?"), dims, attn, moe, fits["all_gather"], fits["reduce_scatter"])
    tbo_steps = [s for s in data.get("steps", []) if s.get("tbo_ms")]
    if tbo_steps:
        def err(g):
            m = dataclasses.replace(model, gamma=g)
            return sum((m.tbo_ms(s["dp"], s["tokens"], s["layers"]) / s["tbo_ms"] - 1) ** 2 for s in tbo_steps)
        model = dataclasses.replace(model, gamma=min(np.linspace(0, 1, 101), key=err).item())
    return model


def check_rows(model: StepModel, data: dict) -> list[dict]:
    """Measured steps of a calibration file beside the model's predictions."""
    rows = []
    for s in data.get("steps", []):
        if not (s.get("base_ms") and s.get("tbo_ms")):
            continue
        r = {k: s.get(k) for k in ("dp", "emulated", "tokens", "layers", "base_ms", "tbo_ms", "fused_ms")}
        r["pred_base_ms"] = model.base_ms(s["dp"], s["tokens"], s["layers"])
        r["pred_tbo_ms"] = model.tbo_ms(s["dp"], s["tokens"], s["layers"])
        r["pred_fused_ms"] = model.fused_ms(s["dp"], s["tokens"], s["layers"])
        rows.append(r)
    return rows


def prediction_rows(model: StepModel, platforms, dps=(2, 4, 8, 16, 32), tokens=(4096, 8192, 16384),
                    link_gbps: float | None = None) -> list[dict]:
    rows = []
    if platform_of(model.device) is None:  # no published figures to scale from: as measured
        platforms = [None]
    for key in platforms:
        target = PLATFORMS[key] if key else None
        for dp in dps:
            if (target and target.max_dp and dp > target.max_dp) or model.dims.experts % dp:
                continue
            m = model.on(target, dp, link_gbps) if target else dataclasses.replace(
                model, device=f"{model.device} (as measured)")
            for t in tokens:
                layers = m.dims.layers
                base, tbo = m.base_ms(dp, t, layers) / layers, m.tbo_ms(dp, t, layers) / layers
                fused = m.fused_ms(dp, t, layers) / layers
                rows.append({"platform": m.device, "model": model.dims.name, "dp": dp, "tokens": t,
                             "base_ms_per_layer": base, "tbo_ms_per_layer": tbo, "ratio": tbo / base,
                             "fused_ms_per_layer": fused, "fused_ratio": fused / base,
                             "comm_share": m.comm_share(dp, t), "crossover": m.crossover(dp),
                             "link_GBps": m.link_GBps})
    return rows


def crossover_table(models: list[StepModel], dps=(1, 2, 4, 8, 16, 32), margin: float = 0.03) -> dict:
    """dp -> smallest tokens per rank where TBO is predicted to win for EVERY calibrated model
    (None: never), on the calibration device. The scheduler's `auto` reads this."""
    out = {}
    for dp in dps:
        cs = []
        for m in models:
            if dp < 2 or m.dims.experts % dp:
                cs.append(None)
                continue
            cs.append(m.crossover(dp, margin))
        out[str(dp)] = None if any(c is None for c in cs) else max(cs)
    return out


# -- command line ---------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tbo-model", help="calibrated base-vs-TBO step model (from dp-step --calibration)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", nargs="+", required=False, default=[],
                   help="calibration JSON files, or `bench dp-step --json` outputs (real and emulated dp; "
                        "grouped by model dimensions)")
    p.add_argument("--platforms", default="h200,mi355x", help=f"comma list of {', '.join(PLATFORMS)}")
    p.add_argument("--dp", default="2,4,8,16,32")
    p.add_argument("--tokens", default="4096,8192,16384", help="tokens per rank")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="published per-rank receive bandwidth (GB/s, one direction) to assume instead of "
                        "the platform's, e.g. 50 for a 400 Gb/s NIC per GPU; the measured efficiency applies")
    p.add_argument("--margin", type=float, default=0.03, help="crossover: TBO <= (1 - margin) x base")
    p.add_argument("--crossover-out", default=None,
                   help="write the per-dp crossover (atom_jax/assets/tbo_crossover.json is the scheduler's)")
    p.add_argument("--json", default=None, help="write fits, checks and predictions here")
    p.set_defaults(func=run_cli)
    return p


def _fmt_fit(m: StepModel) -> str:
    bw = 1e-9 / (m.ag.b * 1e-3) if m.ag.b > 0 else float("inf")
    rbw = 1e-9 / (m.rs.b * 1e-3) if m.rs.b > 0 else float("inf")
    return (f"{m.dims.name} on {m.device}: attn = {m.attn.a:.3f} + {m.attn.b * 1e3:.4f} ms/1K tok; "
            f"moe: c0 {m.moe.c0:.3f} ms, {m.moe.c_rows * 1e6:.3f} ms/M gathered rows, "
            f"{m.moe.q * 1e3:.4f} ms/1K rows computed, weight read {m.moe.q * m.moe.m_star:.4f} ms/expert "
            f"(m* {m.moe.m_star:.0f} rows); AG {m.ag.a:.3f} ms + {bw:.0f} GB/s, RS {m.rs.a:.3f} ms + "
            f"{rbw:.0f} GB/s; overlap gamma {m.gamma:.2f}")


def run_cli(args) -> int:
    if not args.calibration:
        raise SystemExit("tbo-model needs --calibration FILE ... (`bench dp-step --json` outputs)")
    datas = load_calibrations(args.calibration)
    models = [fit_calibration(d) for d in datas]
    dps = [int(x) for x in args.dp.split(",")]
    tokens = [int(x) for x in args.tokens.split(",")]
    out = {"fits": [], "checks": [], "predictions": []}
    for m, d in zip(models, datas):
        print(_fmt_fit(m))
        out["fits"].append({"model": m.dims.name, "device": m.device, "attn": dataclasses.asdict(m.attn),
                            "moe": dataclasses.asdict(m.moe), "ag": dataclasses.asdict(m.ag),
                            "rs": dataclasses.asdict(m.rs), "gamma": m.gamma})
        rows = check_rows(m, d)
        out["checks"] += [{"model": m.dims.name, **r} for r in rows]
        if rows:
            print(f"\nmeasured vs model ({m.dims.name}, {d.get('device')}, {rows[0]['layers']} layers):")
            print(f"{'dp':>4} {'emul':>5} {'tok/rank':>8} {'base':>8} {'pred':>8} {'err':>6} "
                  f"{'TBO':>8} {'pred':>8} {'err':>6} {'TBO/base':>8} {'pred':>6} {'fused/base':>10} {'pred':>6}")
            for r in rows:
                eb = r["pred_base_ms"] / r["base_ms"] - 1
                et = r["pred_tbo_ms"] / r["tbo_ms"] - 1
                print(f"{r['dp']:4d} {'yes' if r['emulated'] else 'no':>5} {r['tokens']:8d} {r['base_ms']:8.2f} "
                      f"{r['pred_base_ms']:8.2f} {eb:+6.1%} {r['tbo_ms']:8.2f} {r['pred_tbo_ms']:8.2f} {et:+6.1%} "
                      f"{r['tbo_ms'] / r['base_ms']:8.3f} {r['pred_tbo_ms'] / r['pred_base_ms']:6.3f} "
                      f"{r['fused_ms'] / r['base_ms'] if r.get('fused_ms') else float('nan'):10.3f} "
                      f"{r['pred_fused_ms'] / r['pred_base_ms']:6.3f}")
        preds = prediction_rows(m, args.platforms.split(","), dps, tokens, args.link_gbps)
        out["predictions"] += preds
        print(f"\npredicted per layer of the full {m.dims.layers}-layer {m.dims.name} (compute scaled by published "
              "peaks off the calibration GPU; fused = one expert GEMM for both chains):")
        print(f"{'platform':24} {'dp':>4} {'tok/rank':>8} {'base ms':>8} {'TBO ms':>8} {'TBO/base':>8} "
              f"{'fused/base':>10} {'comm %':>6} {'link GB/s':>9} {'TBO from':>8}")
        for r in preds:
            print(f"{r['platform']:24} {r['dp']:4d} {r['tokens']:8d} {r['base_ms_per_layer']:8.3f} "
                  f"{r['tbo_ms_per_layer']:8.3f} {r['ratio']:8.3f} {r['fused_ratio']:10.3f} {100 * r['comm_share']:6.1f} "
                  f"{r['link_GBps']:9.0f} {r['crossover'] if r['crossover'] else 'never':>8}")
        print()
    table = crossover_table(models, margin=args.margin)
    out["crossover"] = table
    print("auto TBO from (tokens per rank, every calibrated model, calibration device):",
          ", ".join(f"dp {k}: {v if v else 'never'}" for k, v in table.items()))
    if args.crossover_out:
        with open(args.crossover_out, "w") as f:
            json.dump({"source": "python -m atom_jax.bench tbo-model --calibration " + " ".join(args.calibration),
                       "device": models[0].device, "margin": args.margin,
                       "models": [m.dims.name for m in models], "min_tokens": table,
                       "default": TBO_MIN_TOKENS}, f, indent=1)
            f.write("\n")
        print(f"wrote {args.crossover_out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
