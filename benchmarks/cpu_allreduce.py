"""Cost of one in-process all-reduce between emulated CPU devices, by size.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/cpu_allreduce.py

Sums an [n, size] array sharded over n devices 100 times in a device loop (each iteration is
one all-reduce of ``size`` floats) and prints the median time per all-reduce of 5 runs.
"""
import time, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
n = jax.device_count(); mesh = Mesh(np.array(jax.devices()), ("d",))
for size in (16, 16384, 266610):
    x = jax.device_put(jnp.ones((n, size)), NamedSharding(mesh, P("d")))
    @jax.jit
    def allreduce_loop(x):
        def body(i, acc): return acc + jnp.sum(x * (i+1.0), axis=0)
        return jax.lax.fori_loop(0, 100, body, jnp.zeros((size,)))
    allreduce_loop(x).block_until_ready()
    ts=[]
    for _ in range(5):
        t=time.perf_counter(); allreduce_loop(x).block_until_ready(); ts.append(time.perf_counter()-t)
    print(n, "dev size", size, f"{np.median(ts)*10:.3f} ms per all-reduce")
