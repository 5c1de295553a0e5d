"""The int8 paths that must compile on every backend, as jaxaccel.aot functions: the int8 conv and
dot ops, int8 inference of a CNN, the QAT forward and gradient, and the int8 export's own jitted
inference (the compression report's is the same function).

As a script, ``python tests/aot_int8_paths.py cuda:1x1x8``, it compiles them for the target in a
fresh process (CUDA targets need jax_platforms=cpu before JAX starts) and prints JSON: the figures,
the int8 convolution's compiled HLO, and a bare s8 x s8 -> s32 convolution's result.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxaccel import aot, export
from jaxaccel.config import QuantConfig, model_config
from jaxaccel.models import build_model
from jaxaccel.precision import int8_apply, int8_conv, int8_dense, quantize_params

PTQ, QAT = QuantConfig(mode="ptq"), QuantConfig(mode="qat")
_SHAPE = (28, 28, 1)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def int8_functions(devices: list, workdir: Path) -> dict[str, aot.Function]:
    """Name -> Function: each int8 path with abstract inputs on ``devices``: the ops, int8 inference
    of a CNN with its batch sharded over every device, the QAT model's forward and gradient, and the
    export's inference on one device (the compression report's is the same function)."""
    one = SingleDeviceSharding(devices[0])
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch = NamedSharding(mesh, P("data"))
    cnn = build_model(model_config(name="cnn", conv="xla"), 10)
    params = jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, *_SHAPE), jnp.uint8))["params"]
    qparams, scales = jax.eval_shape(lambda p: quantize_params(p, PTQ), params)
    x_one = jax.ShapeDtypeStruct((8, *_SHAPE), jnp.uint8, sharding=one)
    x_all = jax.ShapeDtypeStruct((8 * len(devices), *_SHAPE), jnp.uint8, sharding=batch)
    i8 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int8, sharding=one)  # noqa: E731
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one)  # noqa: E731
    infer = jax.jit(lambda q, s, x: int8_apply(cnn, q, s, x, cfg=PTQ))

    # QAT on a one-conv model (XLA:TPU took 20 s for the CNN's gradient on this machine).
    qat = build_model(model_config(name="small_cnn", channels=[8], conv="xla"), 10, quant=QAT)
    qat_params = jax.eval_shape(qat.init, jax.random.key(0), jnp.zeros((1, *_SHAPE), jnp.uint8))["params"]

    def qat_loss(params, x):
        return jnp.mean(qat.apply({"params": params}, x) ** 2)

    fns = {
        "int8_conv": aot.Function(jax.jit(int8_conv), (i8((8, 28, 28, 1)), i8((3, 3, 1, 32)), f32(()), f32((32,)))),
        "int8_dense": aot.Function(jax.jit(int8_dense), (i8((8, 784)), i8((784, 256)), f32(()), f32((256,)))),
        "int8_cnn_sharded": aot.Function(infer, (_abstract(qparams, NamedSharding(mesh, P())),
                                                 _abstract(scales, NamedSharding(mesh, P())), x_all)),
        "qat_value_and_grad": aot.Function(jax.jit(jax.value_and_grad(qat_loss)), (_abstract(qat_params, one), x_one)),
    }
    # The int8 export's own inference function, on a real (tiny, random) export.
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), params)
    export.save(workdir / "export", host, model=model_config(name="cnn", conv="xla").model_dump(), num_classes=10,
                image_shape=_SHAPE, quant=PTQ.model_dump())
    loaded = export.load(workdir / "export")
    fns["export_int8"] = aot.Function(loaded._apply, (_abstract(loaded.params, one), _abstract(loaded.scales, one),
                                                      x_one))
    return fns


def compiled_text(function: aot.Function) -> str:
    return function.lower().compile().as_text()


def main(topology: str) -> dict:
    target = aot.parse_target(topology)
    devices = aot.make_devices(target)
    with tempfile.TemporaryDirectory() as tmp:
        fns = int8_functions(devices, Path(tmp))
    result = {"functions": aot.compile_functions(fns, target.device_memory_bytes),
              "int8_conv_hlo": compiled_text(fns["int8_conv"])}
    # A bare s8 x s8 -> s32 convolution (no conversion to f32 after it for XLA:GPU to fold into
    # cuDNN's s8 -> f32 form): what XLA:GPU cannot lower.
    bare = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32))
    result["bare_s32_conv"] = aot.compile_functions({"conv": (bare, fns["int8_conv"].args[:2])})["conv"]
    return result


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    print(json.dumps(main(sys.argv[1])))
