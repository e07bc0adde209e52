"""mHC pieces: the Sinkhorn kernel (kernels/hc_sinkhorn.py) against the jnp reference
(models/hyper.py), and the stream merge against float64 math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atom_jax.bench.mhc import inputs as mhc_inputs, rounding_step
from atom_jax.kernels import hc_sinkhorn
from atom_jax.kernels.platform import lowering_for
from atom_jax.models import hyper

TRITON = "__gpu$xla.gpu.triton"


def _logits(rng, shape):
    return jnp.asarray(rng.standard_normal(shape) * 4.0, jnp.float32)


@pytest.mark.parametrize("lead,n,col0,iters", [((37,), 4, 8, 4), ((2, 5), 3, 1, 2)])
def test_kernel_matches_reference_interpreted(lead, n, col0, iters):
    """The comb of the logits z[..., col0 : col0 + n * n] * scale + bias: ragged token counts (37:
    one partly filled block; 10 over 16-token blocks), V4's 4 x 4 from its [T, 24] mixes and a
    3 x 3 at an odd column between other columns, few iterations (each is unrolled: interpret
    mode compiles slowly; the GPU test runs V4's 20); to float32 rounding (sums of n added in
    another order)."""
    rng = np.random.default_rng()
    z = _logits(rng, (*lead, col0 + n * n + 2))
    scale, bias = jnp.float32(rng.random() + 0.5), _logits(rng, (n * n,))
    got = hc_sinkhorn.sinkhorn_affine(z, n, col0, scale, bias, iters, 1e-6, interpret=True, block_t=16)
    ref = hyper.affine_sinkhorn_reference(z, scale, bias, col0, n, iters, 1e-6)
    assert got.shape == (*lead, n, n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(  # the reference reads those columns, times the scale plus the bias
        np.asarray(ref), np.asarray(hyper.sinkhorn_reference(
            z[..., col0:col0 + n * n].reshape(*lead, n, n) * scale + bias.reshape(n, n), iters, 1e-6)))
    # doubly stochastic to within the eps terms
    np.testing.assert_allclose(np.asarray(got).sum(-2), 1.0, atol=1e-4)


def test_comb_gradient_through_the_kernel():
    """Training (train_tiny) on a GPU differentiates the mHC comb: through the custom VJP (the
    backward is the reference's, recomputed) the reference's gradients for the mixes, the scale
    and the bias."""
    rng = np.random.default_rng()
    n, t = 4, 21
    mixes = _logits(rng, (t, (2 + n) * n))
    scale, bias = jnp.float32(rng.random() + 0.5), _logits(rng, (n * n,))
    w = _logits(rng, (t, n, n))

    def loss(f):
        return jax.grad(lambda m, s, b: jnp.sum(w * f(m, s, b)), argnums=(0, 1, 2))(mixes, scale, bias)

    got = loss(lambda m, s, b: hyper.affine_sinkhorn_kernel(m, s, b, 2 * n, n, 3, 1e-6, True))
    ref = loss(lambda m, s, b: hyper.affine_sinkhorn_reference(m, s, b, 2 * n, n, 3, 1e-6))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(got[0][:, :2 * n])).max() == 0  # pre / post columns: not the comb's


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_hyper_connection_hands_the_kernel_its_mixes(platform):
    """Lowered for a GPU, an mHC block is one Sinkhorn kernel whose operand is the [T, 24] mixes
    (no separate pass writes the comb logits) and no row reductions beyond its norms; its
    gradient over the block's parameters (scale and bias through the custom VJP: train_tiny on
    a GPU) and streams lowers too, with that one kernel (the backward is the reference's)."""
    from flax import nnx

    from atom_jax.config import tiny

    cfg = tiny()
    hc = hyper.HyperConnection(cfg, nnx.Rngs(0))
    streams = jax.ShapeDtypeStruct((64, cfg.hc_mult, cfg.hidden_size), jnp.float32)
    graph, params = nnx.split(hc)

    def loss(p, s):
        post, comb, collapsed = nnx.merge(graph, p)(s)
        return jnp.sum(comb ** 2) + jnp.sum(post) + jnp.sum(collapsed)

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    with lowering_for(platform):
        text = jax.export.export(jax.jit(lambda s: hc(s)), platforms=(platform,), disabled_checks=checks)(
            streams).mlir_module()
        grad = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=(platform,),
                                 disabled_checks=checks)(params, streams).mlir_module()
    calls = [line for line in text.splitlines() if TRITON in line and "stablehlo.custom_call" in line]
    assert len(calls) == 1 and "tensor<64x24xf32>" in calls[0], calls
    assert grad.count(TRITON) == 1


# the comb_of_mixes arguments of a 64-token mHC block (n = 4): mixes, scale, bias
COMB_ARGS = (jax.ShapeDtypeStruct((64, 24), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
             jax.ShapeDtypeStruct((16,), jnp.float32))


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_comb_lowers_to_one_kernel(platform):
    """Lowered for a GPU, an mHC block's Sinkhorn is one Triton kernel and no row reductions;
    on CPU (and with SINKHORN_BACKEND 'jnp') the reference."""
    fn = jax.jit(lambda m, s, b: hyper.comb_of_mixes(m, s, b, 4, 20, 1e-6))
    with lowering_for(platform):
        text = jax.export.export(fn, platforms=(platform,), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*COMB_ARGS).mlir_module()
    assert text.count(TRITON) == 1 and "hc_sinkhorn" in text and "stablehlo.reduce" not in text
    assert TRITON not in fn.lower(*COMB_ARGS).as_text()  # this CPU process: the reference


@pytest.mark.parametrize("how", ["env", "module"])
def test_jnp_backend_is_forced_on_a_gpu(how, monkeypatch):
    """The escape hatch where the kernel fails on a GPU: ATOM_JAX_SINKHORN=jnp (or
    hyper.SINKHORN_BACKEND) lowers the reference for cuda too; an unknown name is refused."""
    if how == "env":
        monkeypatch.setenv(hyper.SINKHORN_ENV, "jnp")
    else:
        monkeypatch.setattr(hyper, "SINKHORN_BACKEND", "jnp")
    fn = jax.jit(lambda m, s, b: hyper.comb_of_mixes(m, s, b, 4, 3, 1e-6))
    with lowering_for("cuda"):
        text = jax.export.export(fn, platforms=("cuda",))(*COMB_ARGS).mlir_module()
    assert TRITON not in text and "stablehlo.reduce" in text
    monkeypatch.setenv(hyper.SINKHORN_ENV, "triton")
    with pytest.raises(ValueError, match="choose 'auto' or 'jnp'"):
        hyper.comb_of_mixes(jnp.zeros((2, 24)), 1.0, jnp.zeros((16,)), 4, 3, 1e-6)


def test_no_tokens_no_launch():
    """An empty token axis returns an empty comb without a zero-program grid."""
    fn = jax.jit(lambda z: hc_sinkhorn.sinkhorn_affine(z, 4, 8, 1.0, jnp.zeros((16,)), 20, 1e-6))
    z = jax.ShapeDtypeStruct((0, 24), jnp.float32)
    with lowering_for("cuda"):
        out = jax.eval_shape(fn, z)
        text = jax.export.export(fn, platforms=("cuda",))(z).mlir_module()
    assert out.shape == (0, 4, 4) and TRITON not in text


def _unrolled_sinkhorn(logits, iters, eps):
    """The Sinkhorn written out as plain jnp (jax differentiates every iteration's copy)."""
    comb = jax.nn.softmax(logits, axis=-1) + eps
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (jnp.sum(comb, axis=-1, keepdims=True) + eps)
        comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)
    return comb


def test_reference_gradient_is_the_unrolled_gradient_from_one_loop():
    """sinkhorn_reference's backward is its rolled form's (one loop body: XLA on an H200 did not
    compile the unrolled backward of V4's 20 iterations in 60 s): the values equal the plain
    unrolled form's and its gradient that form's autodiff gradient (float32 rounding: the same
    operations, fused differently); the backward program does not grow with the iterations."""
    rng = np.random.default_rng()
    logits = _logits(rng, (9, 4, 4))
    w = _logits(rng, (9, 4, 4))
    got = hyper.sinkhorn_reference(logits, 20, 1e-6)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_unrolled_sinkhorn(logits, 20, 1e-6)))

    def grad(f, iters):
        return jax.grad(lambda x: jnp.sum(w * f(x, iters, 1e-6)))

    np.testing.assert_allclose(np.asarray(jax.jit(grad(hyper.sinkhorn_reference, 20))(logits)),
                               np.asarray(jax.jit(grad(_unrolled_sinkhorn, 20))(logits)), rtol=1e-5, atol=1e-6)

    def eqns(f, iters):  # equations of the backward's jaxpr (the forward done), nested ones included
        def count(jaxpr):
            return sum(1 + sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in jaxpr.eqns)
        backward = jax.vjp(lambda x: f(x, iters, 1e-6), logits)[1]
        return count(jax.make_jaxpr(backward)(w).jaxpr)

    assert eqns(hyper.sinkhorn_reference, 20) == eqns(hyper.sinkhorn_reference, 3)
    # the plain form's grows with the iterations: the measure above can see the difference
    assert eqns(_unrolled_sinkhorn, 20) > eqns(_unrolled_sinkhorn, 3) + 17 * 4


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,size", [(1, 1.0), (1000, 1.0), (1000, 30.0), (4099, 30.0)])
def test_comb_from_the_mixes_on_gpu(tokens, size):
    """The model's path on a GPU: the comb from the mixes (scale and bias in the kernel), for one
    token, partly filled last blocks, ordinary and large mixes; values and gradients. Triton
    divides with div.full.f32 (up to 2 ulp) where XLA rounds exactly, and the exps differ by an
    ulp or so; a float32 simulation with every exp and division off by up to 4 ulp stays within
    1e-6 + 1e-5 relative over 1.6M entries (2e-6 relative alone is exceeded by ~1 entry in
    10^5). The kernel may also round mixes * scale + bias once (an FMA) where XLA rounds twice:
    the logits then differ by an ulp of the largest, which moves each output by that much
    relative (the softmax's exp), hence the logit-sized rtol term."""
    rng = np.random.default_rng()
    n = 4
    mixes = _logits(rng, (tokens, (2 + n) * n)) * size
    scale, bias = jnp.float32(1.7), _logits(rng, (n * n,))
    got = jax.jit(lambda m: hyper.comb_of_mixes(m, scale, bias, n, 20, 1e-6))(mixes)
    ref = jax.jit(lambda m: hyper.affine_sinkhorn_reference(m, scale, bias, 2 * n, n, 20, 1e-6))(mixes)
    logit = float(jnp.max(jnp.abs(mixes[:, 2 * n:] * scale + bias)))
    rtol = 1e-5 + 4 * float(np.finfo(np.float32).eps) * logit
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=rtol, atol=1e-6)
    assert np.isfinite(np.asarray(got)).all()
    w = jnp.asarray(rng.standard_normal((tokens, n, n)), jnp.float32)

    def grads(f):
        return jax.jit(jax.grad(lambda m, s, b: jnp.sum(w * f(m, s, b)), argnums=(0, 1, 2)))(mixes, scale, bias)

    got = grads(lambda m, s, b: hyper.comb_of_mixes(m, s, b, n, 20, 1e-6))
    ref = grads(lambda m, s, b: hyper.affine_sinkhorn_reference(m, s, b, 2 * n, n, 20, 1e-6))
    for g, r in zip(got, ref):  # the backward is the reference's, recomputed (XLA may fuse it otherwise)
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_hc_merge_matches_float64(dtype, tol):
    """post[k] * out + sum_j comb[j, k] * streams[j], with the mixing sum exact to float32 and
    rounded once to the streams' dtype."""
    rng = np.random.default_rng()
    t, n, d = 5, 4, 48
    streams = jnp.asarray(rng.standard_normal((t, n, d)), dtype)
    out = jnp.asarray(rng.standard_normal((t, d)), dtype)
    post = jnp.asarray(rng.random((t, n)) * 2, jnp.float32)
    comb = hyper.sinkhorn_reference(_logits(rng, (t, n, n)), 20, 1e-6)
    got = np.asarray(hyper.hc_merge(streams, out, post, comb).astype(jnp.float32), np.float64)
    s64 = np.asarray(streams.astype(jnp.float32), np.float64)
    c64 = np.asarray(comb.astype(dtype).astype(jnp.float32), np.float64)
    p64 = np.asarray(post.astype(dtype).astype(jnp.float32), np.float64)
    ref = p64[..., None] * np.asarray(out.astype(jnp.float32), np.float64)[:, None, :] + np.einsum("tjk,tjd->tkd", c64, s64)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hc_mixes_match_float64(dtype):
    """rms_norm(flattened streams) @ fn in float64 (the streams as given): the bf16 path's one
    product with [hi | lo] halves of fn keeps float32-level accuracy (where bf16(fn) alone
    would be ~1e-3 off)."""
    rng = np.random.default_rng()
    t, n, d, m = 6, 4, 64, 24
    streams = jnp.asarray(rng.standard_normal((t, n, d)) * 3, dtype)
    fn = jnp.asarray(rng.standard_normal((n * d, m)) / 16, jnp.float32)
    x = np.asarray(streams.astype(jnp.float32), np.float64).reshape(t, n * d)
    ref = (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)) @ np.asarray(fn, np.float64)
    got = np.asarray(hyper.hc_mixes(streams, fn, 1e-6), np.float64)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 2e-5 * scale
    if dtype == jnp.bfloat16:  # what the split buys
        crude = np.asarray(jnp.dot(streams.reshape(t, -1), fn.astype(jnp.bfloat16), preferred_element_type=jnp.float32),
                           np.float64) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        assert np.abs(crude - ref).max() > 10 * np.abs(got - ref).max()


def _merge_inputs(rng, t, n=4, d=128, m=24):
    """bench mhc's inputs (bf16 streams and output, Sinkhorn combs), fresh for each call."""
    return mhc_inputs(t, n, d, m, jnp.bfloat16, seed=int(rng.integers(2**63)))


def _bf16_steps(x):
    return rounding_step(x, jnp.bfloat16)


def _check_merge_mix(got_streams, got_mixes, streams, out, post, comb, fn):
    """hc_merge's streams to within one bf16 rounding (XLA on a GPU may keep the product unrounded)
    and hc_mixes' mixes of them to float32-level accuracy."""
    ref = np.asarray(hyper.hc_merge(streams, out, post, comb), np.float32)
    got = np.asarray(got_streams, np.float32)
    # either side may round post x out and the mixed sum before adding them, or not (XLA's excess
    # precision): a step of bf16 at the larger of the two terms (cancellation leaves ref tiny)
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    prod = f64(post)[..., None] * f64(out)[:, None, :]
    mixed = np.einsum("tjk,tjd->tkd", f64(comb), f64(streams))
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= _bf16_steps(np.maximum(np.abs(prod), np.abs(mixed))))
    mixes = np.asarray(hyper.hc_mixes(jnp.asarray(ref, jnp.bfloat16), fn, 1e-6))
    assert np.abs(np.asarray(got_mixes) - mixes).max() < 2e-5 * np.abs(mixes).max()


@pytest.mark.parametrize("t,block_t,block_d,chunk_d", [(37, 16, 32, 64), (16, 16, 128, 128)])
def test_merge_mix_kernel_interpreted(t, block_t, block_d, chunk_d):
    """kernels/hc_merge_mix.py (interpreted): ragged token counts (37 over 16-token programs), the
    stream columns in two chunks of two steps, or one chunk of one step; products and squares give
    the mixes."""
    from atom_jax.kernels import hc_merge_mix
    rng = np.random.default_rng()
    args = _merge_inputs(rng, t)
    merged, products, squares = hc_merge_mix.merge_mix(*args, interpret=True, block_t=block_t, block_d=block_d,
                                                       chunk_d=chunk_d)
    n, d = args[0].shape[1:]
    flat = np.asarray(merged, np.float64).reshape(t, -1)
    np.testing.assert_allclose(np.asarray(squares), (flat ** 2).sum(1), rtol=1e-5)
    _check_merge_mix(merged, products * jax.lax.rsqrt(squares / (n * d) + 1e-6)[:, None], *args)


def test_after_merge_kernel_path_matches_jnp_path(monkeypatch):
    """HyperConnection.after_merge with the kernel (forced here; a GPU's choice at prefill sizes) against
    its jnp path (hc_merge, then the block's mHC): streams, post, comb and the collapsed input."""
    from flax import nnx

    from atom_jax.config import tiny

    cfg = tiny()
    hc = hyper.HyperConnection(cfg, nnx.Rngs(0))
    rng = np.random.default_rng()
    streams, out, post, comb, _ = _merge_inputs(rng, 21, cfg.hc_mult, cfg.hidden_size)
    want = hc.after_merge(streams, out, post, comb)
    monkeypatch.setattr(hyper, "use_merge_mix", lambda *a: True)
    got = hc.after_merge(streams, out, post, comb)
    assert np.all(np.abs(np.asarray(got[0], np.float32) - np.asarray(want[0], np.float32))
                  <= _bf16_steps(np.asarray(want[0], np.float32)))
    for g, w in zip(got[1:3], want[1:3]):  # post, comb: float32 functions of the mixes
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    collapsed = np.asarray(want[3], np.float32)  # bf16, from the streams
    assert np.all(np.abs(np.asarray(got[3], np.float32) - collapsed) <= _bf16_steps(collapsed))


@pytest.mark.parametrize("tokens,backend,kernel", [(1024, "auto", True), (1023, "auto", False), (1024, "jnp", False)])
def test_after_merge_lowers_to_the_kernel_at_prefill_sizes(tokens, backend, kernel, monkeypatch):
    """Lowered for a GPU with bf16 streams under MERGE_MIX_BACKEND "auto", after_merge is one
    hc_merge_mix kernel (beside the Sinkhorn's) from MERGE_MIX_MIN_TOKENS tokens and XLA's merge
    below; under "jnp" XLA's merge always; on this CPU the jnp path always."""
    monkeypatch.setattr(hyper, "MERGE_MIX_BACKEND", backend)
    from flax import nnx

    from atom_jax.config import tiny

    cfg = tiny()
    hc = hyper.HyperConnection(cfg, nnx.Rngs(0))
    n, d = cfg.hc_mult, cfg.hidden_size
    shapes = (jax.ShapeDtypeStruct((tokens, n, d), jnp.bfloat16), jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16),
              jax.ShapeDtypeStruct((tokens, n), jnp.float32), jax.ShapeDtypeStruct((tokens, n, n), jnp.float32))
    fn = jax.jit(hc.after_merge)
    with lowering_for("cuda"):
        text = jax.export.export(fn, platforms=("cuda",), disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*shapes).mlir_module()
    calls = [line for line in text.splitlines() if TRITON in line and "stablehlo.custom_call" in line]
    assert len(calls) == 1 + kernel  # the Sinkhorn's kernel, and the merge's
    assert TRITON not in fn.lower(*shapes).as_text()  # this CPU process: the jnp path


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4099])
def test_merge_mix_kernel_on_gpu(tokens):
    """The compiled kernel at V4-Flash's streams (4 x 4096, 24 mixes), a partly filled last program."""
    from atom_jax.kernels import hc_merge_mix
    rng = np.random.default_rng()
    args = _merge_inputs(rng, tokens, 4, 4096, 24)
    merged, products, squares = jax.jit(hc_merge_mix.merge_mix)(*args)
    _check_merge_mix(merged, products * jax.lax.rsqrt(squares / (4 * 4096) + 1e-6)[:, None], *args)


@pytest.mark.gpu
def test_hc_mixes_keep_float32_accuracy_on_gpu():
    """The bf16 path's fn halves on a GPU, compiled: against float64, as test_hc_mixes_match_float64
    on CPU. (XLA removes a convert to bf16 and back where excess precision is allowed, which made lo
    0 and the mixes bf16-accurate, ~1e-3: found by the merge kernel's GPU test, session 23.)"""
    rng = np.random.default_rng()
    t, n, d, m = 64, 4, 4096, 24
    streams = jnp.asarray(rng.standard_normal((t, n, d)) * 3, jnp.bfloat16)
    fn = jnp.asarray(rng.standard_normal((n * d, m)) / 16, jnp.float32)
    x = np.asarray(streams.astype(jnp.float32), np.float64).reshape(t, n * d)
    ref = (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)) @ np.asarray(fn, np.float64)
    got = np.asarray(jax.jit(lambda s, f: hyper.hc_mixes(s, f, 1e-6))(streams, fn), np.float64)
    assert np.abs(got - ref).max() < 2e-5 * np.abs(ref).max()


def test_merge_kernel_only_where_its_tiles_divide_the_width(monkeypatch):
    """use_merge_mix asks the kernel's default tiles (a program's chunk of D, then its steps) to divide
    the streams' width: V4-Flash's 4096 and a width under one chunk do, 768 (512-column chunks) does not."""
    from atom_jax.kernels import hc_merge_mix
    assert hc_merge_mix.fits(4096) and hc_merge_mix.fits(256) and not hc_merge_mix.fits(768)
    monkeypatch.setattr(hyper, "MERGE_MIX_BACKEND", "auto")
    monkeypatch.setattr(hyper, "is_cpu", lambda: False)  # as lowered for a GPU
    s = lambda d: jnp.zeros((1024, 4, d), jnp.bfloat16)  # noqa: E731
    assert hyper.use_merge_mix(s(4096), jnp.zeros((1024, 4096), jnp.bfloat16))
    assert not hyper.use_merge_mix(s(768), jnp.zeros((1024, 768), jnp.bfloat16))
