"""`python -m atom_jax.bench sass`: a Triton kernel's registers, spills and SASS, offline (no GPU).

The kernel call is lowered on this CPU for CUDA (`kernels.platform.lowering_for`), each Triton
custom call's module is taken from the lowered program (the `__gpu$xla.gpu.triton` call's
backend_config holds it as MLIR bytecode in the `ir` string; read back with jaxlib's Triton
dialect and printed as TTIR text: no pip Triton needed for that step), compiled by pip Triton
(`pip install triton`) for cuda sm_90a (capability 90) with the call's num_warps / num_stages:
Triton's TTIR passes first, as XLA runs them (`ttir_passes`: triton.compile skips them for a
.ttir source, and without them add(dot(a, b, 0), c) is not folded into dot(a, b, c)), then the
rest of Triton's pipeline, `ptxas -arch=sm_90a -v` (registers, spill bytes) and `nvdisasm`
(SASS). Per kernel: registers per thread, spill store/load bytes, shared memory, the compiled
TTIR's tt.dots and how many of them start from a zero accumulator (`dot_accumulators`), and the
SASS of its innermost loops: a loop is a backward branch (a BRA to an earlier label), innermost
when no other loop lies inside it; the hot loop is the last innermost one in the code (the
attention kernel's entries loop for `all` / `list`, its window loop for `none`; none when the
window is one step, 128 keys a step, and the table shows the whole kernel's counts; the W4A16
kernel's K loop). Counts in it: SASS instructions, HGMMA (Hopper wgmma) / HMMA (mma.sync), LDG,
LDGSTS (cp.async), LDS (+LDSM), STS, and the spill traffic STL / LDL (count, and bytes a thread
moves per iteration).

    python -m atom_jax.bench sass --kernel attention --tiles default,64x128x8x1x0x1x1x4
    python -m atom_jax.bench sass --kernel w4a16 --tokens 64,8192 --json w4.json
    python -m atom_jax.bench sass --kernel attention --modes all --keep /tmp/sass   # + ttir/ttgir/ptx/sass files

Indicative only: pip Triton's pipeline is not the one inside XLA (jaxlib's Triton), and ptxas
here is Triton's bundled one (CUDA 13.x), not the one XLA calls on the GPU machine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

TRITON_TARGET = "__gpu$xla.gpu.triton"
INSTALL = "pip install triton"
CAPABILITY = 90  # H200 (sm_90a)
ATTENTION_MODES = ("all", "list", "none")


@dataclasses.dataclass(frozen=True)
class TritonModule:
    """One Triton custom call of a lowered program: its kernel's TTIR text and launch options."""
    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


# --- extraction (jax only) -------------------------------------------------------------------

def _walk(op):
    for region in op.regions:
        for block in region.blocks:
            for o in block.operations:
                yield o
                yield from _walk(o)


def triton_modules(lowered) -> list[TritonModule]:
    """The Triton modules of a `jax.stages.Lowered` (lowered for cuda or rocm), in program order."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    module = lowered.compiler_ir("stablehlo")
    out = []
    for call in _walk(module.operation):
        if call.name != "stablehlo.custom_call" or \
                ir.StringAttr(call.attributes["call_target_name"]).value != TRITON_TARGET:
            continue
        if "mhlo.backend_config" not in call.attributes:  # jax's opaque proto form: not read here
            raise RuntimeError(f"a {TRITON_TARGET} call without mhlo.backend_config: this jax's Pallas "
                               "lowering serializes the kernel another way")
        cfg = ir.DictAttr(call.attributes["mhlo.backend_config"])
        ctx = mlir.make_ir_context()
        tt_dialect.register_dialect(ctx)
        with ctx:  # the kernel as MLIR bytecode, read back in a context that knows the tt dialect
            kernel = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)
            text = kernel.operation.get_asm(enable_debug_info=False)
        i32 = lambda k: ir.IntegerAttr(cfg[k]).value  # noqa: E731
        out.append(TritonModule(ir.StringAttr(cfg["name"]).value, text, i32("num_warps"), i32("num_stages"),
                                (i32("grid_x"), i32("grid_y"), i32("grid_z"))))
    return out


def _is_zero(value) -> bool:
    """A zero constant: arith.constant 0 / dense<0>, or tt.splat of one (as Pallas writes a dot's
    accumulator before canonicalization folds the splat)."""
    from jax._src.lib.mlir import ir

    owner = value.owner
    if not isinstance(owner, (ir.Operation, ir.OpView)):
        return False  # a block argument: a loop-carried accumulator
    op = owner.operation
    if op.name == "tt.splat":
        return _is_zero(op.operands[0])
    if op.name != "arith.constant":
        return False
    attr = op.attributes["value"]
    if isinstance(attr, ir.DenseElementsAttr):
        return attr.is_splat and _zero_attr(attr.get_splat_value())
    return _zero_attr(attr)


def _zero_attr(attr) -> bool:
    from jax._src.lib.mlir import ir

    return isinstance(attr, (ir.FloatAttr, ir.IntegerAttr)) and attr.value == 0


def dot_accumulators(ttir: str) -> list[dict]:
    """Every tt.dot of a TTIR module (Pallas' or after Triton's passes), in order: its result type,
    whether its accumulator operand is a zero constant, and whether Triton's combine pattern
    (Combine.td: add(dot(a, b, 0), c) in either order, the dot's result used once, no
    maxNumImpreciseAcc) folds the add that uses it into dot(a, b, c)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    ctx = mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    out = []
    with ctx:
        module = ir.Module.parse(ttir)
        for op in _walk(module.operation):
            if op.operation.name != "tt.dot":
                continue
            op = op.operation
            zero = _is_zero(op.operands[2])
            uses = list(op.results[0].uses)
            imprecise = op.attributes["maxNumImpreciseAcc"] if "maxNumImpreciseAcc" in op.attributes else None
            folds = (zero and len(uses) == 1 and uses[0].owner.operation.name in ("arith.addf", "arith.addi")
                     and (imprecise is None or ir.IntegerAttr(imprecise).value == 0))
            out.append(dict(type=str(op.results[0].type), zero_acc=zero, folds=folds))
    return out


def lower_for_cuda(fn, *args):
    """fn(*args) (abstract args: jax.ShapeDtypeStruct) jitted and lowered for cuda on this host."""
    import jax

    from atom_jax.kernels.platform import lowering_for

    with lowering_for("cuda"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def attention_modules(tiles, mode: str, dims: dict | None = None) -> list[TritonModule]:
    """sparse_attention.attend's kernel for `mode` (all / list / none) at `dims` (bench attention's
    V4-Flash chunk by default: 8192 tokens, 64 heads, dim 512, window 128, 512 selected), one
    program per token (splits 1), lowered for cuda."""
    import jax
    import jax.numpy as jnp

    from atom_jax.bench.attention import RATIO, V4
    from atom_jax.kernels import sparse_attention as sa

    d = dict(V4, **(dims or {}))
    S = jax.ShapeDtypeStruct
    t, h, dim, win, slots = d["tokens"], d["heads"], d["dim"], d["window"], 2
    max_pages = -(-(d["start"] + t) // d["page_tokens"])
    b = {k: S((t,), jnp.int32) for k in ("pos", "slot", "seg_start_idx", "seg_start_pos")}
    kw = {}
    if mode != "none":
        epp = d["page_tokens"] // RATIO[mode]
        kw = dict(pool=S((slots * max_pages * epp, dim), jnp.bfloat16), page_table=S((slots, max_pages), jnp.int32),
                  n_visible=S((t,), jnp.int32), selected=S((t, d["selected"]), jnp.int32) if mode == "list" else None)
    else:
        epp = 1

    def call(q, kv, ring, rpos, b, sinks, kw):
        return sa.attend(q, kv, ring, rpos, b, sinks, dim ** -0.5, epp=epp, tiles=tiles, splits=1, **kw)
    return triton_modules(lower_for_cuda(call, S((t, h, dim), jnp.bfloat16), S((t, dim), jnp.bfloat16),
                                         S((slots, win, dim), jnp.bfloat16), S((slots, win), jnp.int32), b,
                                         S((h,), jnp.float32), kw))


def w4a16_modules(shape: str, tokens: int, k_major: bool = False) -> list[TritonModule]:
    """w4a16_grouped_gemm at a V4 expert shape (bench gemm's SHAPES: local experts, K, N), tokens x
    top-k rows spread over the experts, its default tiles for that many rows per expert."""
    import jax
    import jax.numpy as jnp

    from atom_jax.bench.gemm import SHAPES, TOPK
    from atom_jax.kernels import packed
    from atom_jax.kernels import w4a16_grouped_gemm as wg

    g, k, n = SHAPES[shape]
    S = jax.ShapeDtypeStruct
    codes = S((g, n, k // 2), jnp.uint8) if k_major else S((g, k // 2, n), jnp.uint8)
    w = (packed.Fp4WeightsKMajor if k_major else packed.Fp4Weights)(codes, S((g, k // 32, n), jnp.uint8))
    return triton_modules(lower_for_cuda(lambda rows, w, sizes: wg.grouped_gemm(rows, w, sizes),
                                         S((tokens * TOPK, k), jnp.bfloat16), w, S((g,), jnp.int32)))


# --- compile (pip Triton, ptxas, nvdisasm) ---------------------------------------------------

def _triton():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise SystemExit(f"bench sass needs pip Triton to compile the kernels: `{INSTALL}` ({e})") from None
    return triton, GPUTarget


def _tool(name: str, given: str | None = None) -> str:
    """ptxas / nvdisasm / cuobjdump: `given`, else the one pip Triton uses or bundles (its ptxas
    for sm_90: CUDA 13.x, which reads the PTX version Triton 3.9 writes), else PATH and CUDA's."""
    if given:
        return given
    try:
        from triton.backends.nvidia import compiler as nv
        if name == "ptxas":
            return nv.get_ptxas(CAPABILITY).path
        bundled = Path(nv.__file__).parent / "bin" / name
        if bundled.exists():
            return str(bundled)
    except (ImportError, AttributeError):
        pass
    for cand in (shutil.which(name), *sorted(Path("/usr/local").glob(f"cuda*/bin/{name}"), reverse=True)):
        if cand and Path(cand).exists():
            return str(cand)
    return ""


def _version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "?"


def parse_ptxas(log: str) -> dict:
    """`ptxas -v`'s registers, spill store/load bytes and stack frame of the (one) function."""
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    return dict(registers=num(r"Used (\d+) registers"), spill_store_B=num(r"(\d+) bytes spill stores"),
                spill_load_B=num(r"(\d+) bytes spill loads"), stack_B=num(r"(\d+) bytes stack frame"))


def ttir_passes(ttir: str) -> str:
    """The TTIR after Triton's own TTIR passes (make_ttir: inline, canonicalize, combine -- which
    folds add(dot(a, b, 0), c) into dot(a, b, c) --, reorder broadcasts, CSE, DCE, loop unroll), as
    XLA runs them on a Pallas kernel (MakeTTIR in its compilation_pipeline_cuda.cc). triton.compile
    starts a .ttir source after that stage, so they are run here first."""
    triton, GPUTarget = _triton()
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", CAPABILITY, 32))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ttir"
        src.write_text(ttir)
        module = ir.parse_mlir_module(str(src), ctx)
    module.context = ctx
    backend.make_ttir(module, {}, None, CAPABILITY)
    return str(module)


def compile_module(mod: TritonModule, ptxas: str | None = None, nvdisasm: str | None = None,
                   keep: str | None = None, passes: bool = True) -> dict:
    """TTIR -> (pip Triton: its TTIR passes unless not `passes`, then the rest) TTGIR, PTX;
    -> (ptxas -v) cubin, registers, spills; -> SASS."""
    triton, GPUTarget = _triton()
    ttir = ttir_passes(mod.ttir) if passes else mod.ttir
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{mod.name}.ttir"
        src.write_text(ttir)
        k = triton.compile(str(src), target=GPUTarget("cuda", CAPABILITY, 32),
                           options=dict(num_warps=mod.num_warps, num_stages=mod.num_stages))
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(k.asm["ptx"])
        ptxas = _tool("ptxas", ptxas)
        run = subprocess.run([ptxas, f"-arch=sm_{CAPABILITY}a", "-v", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{ptxas} failed: {run.stderr.strip()}")
        info = dict(parse_ptxas(run.stderr), shared_B=int(k.metadata.shared), ptxas=_version(ptxas))
        dis = _tool("nvdisasm", nvdisasm)
        if dis:
            sass = subprocess.run([dis, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        elif dump := _tool("cuobjdump"):
            sass = subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        else:
            sass = ""
        if keep:
            out = Path(keep)
            out.mkdir(parents=True, exist_ok=True)
            for ext, text in (("pallas.ttir", mod.ttir), ("ttir", ttir), ("ttgir", k.asm["ttgir"]),
                              ("ptx", k.asm["ptx"]), ("sass", sass)):
                (out / f"{mod.name}.{ext}").write_text(text)
    dots = dot_accumulators(ttir)
    return dict(info, dots=len(dots), zero_acc_dots=sum(d["zero_acc"] for d in dots), **sass_counts(sass), ttir=ttir,
                ttgir=k.asm["ttgir"])


# --- SASS ------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_WIDTH = {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}


def parse_sass(text: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
    """nvdisasm / cuobjdump SASS -> [(address, opcode with modifiers, operands)], {label: address}."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.search(line):
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3)))
    return instrs, labels


def loops(instrs, labels) -> list[tuple[int, int]]:
    """(first, last) instruction index of each innermost loop (a branch back to an earlier label), in
    code order."""
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    spans = []
    for i, (addr, op, args) in enumerate(instrs):
        m = re.search(r"\((\.L_\w+)\)", args)
        # not the trap after EXIT (a BRA to itself)
        if op.split(".")[0] == "BRA" and m and labels.get(m.group(1), addr) < addr:
            spans.append((index[labels[m.group(1)]], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return sorted(inner)


def counts(instrs) -> dict:
    """Instruction counts by kind and the spill (local memory) bytes a thread moves."""
    base = [op.split(".")[0] for _, op, _ in instrs]

    def local_bytes(kind):
        return sum(next((_WIDTH[m] for m in op.split(".")[1:] if m in _WIDTH), 4)
                   for _, op, _ in instrs if op.split(".")[0] == kind)
    c = {k: base.count(k) for k in ("HGMMA", "HMMA", "LDG", "LDGSTS", "STG", "STS", "STL", "LDL")}
    c["LDS"] = base.count("LDS") + base.count("LDSM")
    return dict(instructions=len(instrs), **c, spill_load_B=local_bytes("LDL"), spill_store_B=local_bytes("STL"))


def sass_counts(text: str) -> dict:
    """Whole-kernel counts, every innermost loop's, and the hot (last) loop's."""
    instrs, labels = parse_sass(text)
    spans = loops(instrs, labels)
    per_loop = [counts(instrs[a:b + 1]) for a, b in spans]
    return dict(code=counts(instrs), loops=per_loop, hot_loop=per_loop[-1] if per_loop else None)


# --- the command -----------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    ap = subparsers.add_parser("sass", help="offline registers, spills and SASS loop counts of a Triton kernel "
                               "(lowered here for cuda, compiled by pip Triton + ptxas for sm_90a; no GPU)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=("attention", "w4a16"), default="attention")
    ap.add_argument("--tiles", "--attention-tiles", dest="tiles", default="default",
                    help="attention: comma list of tile specs, default or HxKxW[xS[xP[xD[xT[xC[xR[xO[xF]]]]]]]] as "
                    "bench attention / long-context --attention-tiles (default: default)")
    ap.add_argument("--modes", default=",".join(ATTENTION_MODES), help="attention: comma list of all,list,none")
    ap.add_argument("--shapes", default="flash_up,flash_down", help="w4a16: comma list of bench gemm's SHAPES")
    ap.add_argument("--tokens", default="8,64,8192", help="w4a16: comma list of token counts (x top-k rows)")
    ap.add_argument("--k-major", action="store_true", help="w4a16: K-major codes (Fp4WeightsKMajor)")
    ap.add_argument("--ptxas", help="ptxas to run (default: pip Triton's for sm_90)")
    ap.add_argument("--nvdisasm", help="nvdisasm to run (default: pip Triton's bundled one)")
    ap.add_argument("--keep", help="write each kernel's pallas.ttir (as lowered) / ttir (after Triton's TTIR passes) "
                    "/ ttgir / ptx / sass to this folder")
    ap.add_argument("--no-ttir-passes", action="store_true",
                    help="compile the Pallas TTIR without Triton's TTIR passes (as session 11's scripts did: no "
                    "dot-add fold, no CSE; not what XLA runs)")
    ap.add_argument("--json")
    ap.set_defaults(func=run_cli)
    return ap


def _cases(args):
    """(label, fields, lazily lowered modules) per kernel configuration asked for."""
    if args.kernel == "attention":
        from atom_jax.bench.long_context import attention_tiles
        from atom_jax.kernels import sparse_attention as sa

        modes = args.modes.split(",")
        if not set(modes) <= set(ATTENTION_MODES):
            raise SystemExit(f"--modes: {args.modes!r}: each of {', '.join(ATTENTION_MODES)}")
        specs = args.tiles.split(",")
        tiles_of = {s: attention_tiles(s) or sa.TILES for s in specs}  # parsed up front: a bad spec fails first
        for spec, tiles in tiles_of.items():
            for mode in modes:
                yield (f"{spec} {mode}", dict(tiles=spec, mode=mode, keys_per_step=tiles.block_k),
                       lambda tiles=tiles, mode=mode: attention_modules(tiles, mode))
    else:
        from atom_jax.bench.gemm import SHAPES

        shapes = args.shapes.split(",")
        if unknown := set(shapes) - set(SHAPES):
            raise SystemExit(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
        for shape in shapes:
            for t in (int(x) for x in args.tokens.split(",")):
                yield (f"{shape} {t}", dict(shape=shape, tokens=t, k_major=args.k_major),
                       lambda shape=shape, t=t: w4a16_modules(shape, t, args.k_major))


HOT_COLUMNS = ("instructions", "HGMMA", "HMMA", "LDG", "LDGSTS", "LDS", "STL", "LDL")


def _line(label, r) -> str:
    """One table row: the kernel's registers, spill bytes, shared memory; its hot loop's counts."""
    hot = r["hot_loop"] or r["code"]  # no loop (a one-step window): the whole kernel's, marked
    spill = f"{r['spill_store_B']}/{r['spill_load_B']}"
    counts = " ".join(f"{hot[c]:>{max(len(c), 5)}}" for c in HOT_COLUMNS)
    dots = f"{r['dots']}/{r['zero_acc_dots']}"
    return (f"{label:>34.34} {r['registers']:>4} {spill:>13} {r['shared_B'] / 1024:>8.0f} {dots:>9} | {counts} "
            f"{hot['spill_load_B']}/{hot['spill_store_B']}" + ("" if r["hot_loop"] else " (no loop: whole kernel)"))


def run_cli(args) -> int:
    _triton()  # fail early, with the install command, before any lowering
    rows = []
    print(f"{'kernel':>34} {'regs':>4} {'spill st/ld B':>13} {'smem KiB':>8} {'dots/0acc':>9} | "
          + " ".join(f"{c:>{max(len(c), 5)}}" for c in HOT_COLUMNS) + " spill ld/st B (right of |: the hot loop)",
          flush=True)
    for label, fields, modules in _cases(args):
        for mod in modules():
            keep = args.keep and os.path.join(args.keep, label.replace(" ", "_"))
            r = compile_module(mod, args.ptxas, args.nvdisasm, keep, passes=not args.no_ttir_passes)
            r.pop("ttir"), r.pop("ttgir")
            rows.append(dict(fields, kernel=mod.name, num_warps=mod.num_warps, num_stages=mod.num_stages, **r))
            print(_line(label, r), flush=True)
    if rows:
        print(f"(ptxas: {rows[0]['ptxas']}; sm_{CAPABILITY}a; per thread; dots/0acc: tt.dots in the compiled TTIR / "
              "those accumulating from zero; hot loop = the last innermost loop)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(capability=CAPABILITY, results=rows), f, indent=1)
    return 0
