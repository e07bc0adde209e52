"""XLA compile time of the mHC comb's gradient on a GPU, one subprocess per case (a case that hangs
is killed at its limit and reported as such): the reference's and the kernel's gradients as the
code has them (since 5615e55 the rolled form's backward), and `unrolled_grad`, plain autodiff
through the 20 unrolled iterations (what both were before). Session 17's run
(docs/bench_data/s17_mhc_grad_compile_h200.jsonl) predates the fix: its ref_grad / kernel_grad are
the unrolled form's (timed out at 60 s), its rolled_grad the loop form's (0.6 s).

    python scripts/gpu/mhc_grad_compile.py [limit_s]
"""
import json
import subprocess
import sys
import time

CASE = r'''
import sys, time
import jax, jax.numpy as jnp, numpy as np
from atom_jax.models import hyper
case, tokens = sys.argv[1], int(sys.argv[2])
n, iters, eps = 4, 20, 1e-6
rng = np.random.default_rng(0)
mixes = jnp.asarray(rng.standard_normal((tokens, (2 + n) * n)) * 4, jnp.float32)
scale, bias = jnp.float32(1.7), jnp.asarray(rng.standard_normal(n * n), jnp.float32)
w = jnp.asarray(rng.standard_normal((tokens, n, n)), jnp.float32)

def unrolled(m, s, b):  # the reference before 5615e55: its unrolled forward, without the custom VJP (plain
    # autodiff through every iteration's copy)
    logits = m[..., 2 * n:].reshape(*m.shape[:-1], n, n) * s + b.reshape(n, n)
    return hyper.sinkhorn_reference.fun(logits, iters, eps)

fns = {"kernel_fwd": lambda m, s, b: hyper.comb_of_mixes(m, s, b, n, iters, eps),
       "ref_fwd": lambda m, s, b: hyper.affine_sinkhorn_reference(m, s, b, 2 * n, n, iters, eps)}
grads = {"kernel_grad": fns["kernel_fwd"], "ref_grad": fns["ref_fwd"], "unrolled_grad": unrolled}
if case in fns:
    f = jax.jit(fns[case])
else:
    g = grads[case]
    f = jax.jit(jax.grad(lambda m, s, b: jnp.sum(w * g(m, s, b)), argnums=(0, 1, 2)))
t = time.perf_counter()
c = f.lower(mixes, scale, bias).compile()
ct = time.perf_counter() - t
jax.block_until_ready(c(mixes, scale, bias))
print("RESULT", ct)
'''


def main():
    limit = float(sys.argv[1]) if len(sys.argv) > 1 else 60
    rows = []
    for case in ("kernel_fwd", "ref_fwd", "ref_grad", "kernel_grad", "unrolled_grad"):
        for tokens in (1, 1000):
            t0 = time.time()
            try:
                p = subprocess.run([sys.executable, "-c", CASE, case, str(tokens)], capture_output=True, text=True,
                                   timeout=limit)
                res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
                row = {"case": case, "tokens": tokens, "compile_s": float(res[0].split()[1]) if res else None,
                       "rc": p.returncode, "err": p.stderr[-400:] if not res else ""}
            except subprocess.TimeoutExpired:
                row = {"case": case, "tokens": tokens, "compile_s": None, "rc": "timeout", "wall_s": limit}
            row["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if row["rc"] == "timeout":
                break  # the larger size of a case that hangs would hang too


if __name__ == "__main__":
    main()
