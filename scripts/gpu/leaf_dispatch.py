"""Host cost of calling a compiled program per argument buffer (issue 27: at full depth the step takes
~1,700 parameter and cache arrays; a one-kernel program over the 4-layer step's ~120 cost 0.54 ms in s15).
Prints ms per call, device idle, for 10 .. 2,000 small arguments; run on the GPU machine."""
import time

import jax
import jax.numpy as jnp

for n in (10, 100, 300, 1000, 2000):
    args = [jnp.full((256,), i, jnp.bfloat16) for i in range(n)]
    f = jax.jit(lambda xs: xs[0] + 1).lower(args).compile()
    jax.block_until_ready(f(args))
    t = time.perf_counter()
    for _ in range(50):
        jax.block_until_ready(f(args))
    print(f"{n:5d} arguments: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms per call (waited)", flush=True)
