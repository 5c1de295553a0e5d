"""Your own model against ours: epoch time of a plain-linen copy of mnist_cnn, and full runs of user
models through sparsity, bf16 and QAT with their exports checked against the trained model.

    python benchmarks/user_model.py [--rounds 3] [--epochs 2]
    python benchmarks/user_model.py --accuracy [--models cnn mlp] [--experiments mnist_sparse mnist_bf16 mnist_qat]

Speed (issue 18's target: at most 1.3x): ``exp=mnist_cnn`` against ``exp=mnist_cnn
model.name=tests.user_models:FlaxExampleCNN`` (plain ``nn.Conv`` / ``nn.avg_pool`` / ``nn.Dense``,
exactly mnist_cnn's architecture: checked first, same parameter tree and same logits on the same
parameters). Each run is a fresh ``python -m jaxaccel.run`` process with its own workdir, the two
alternating (ours, user's, ours, ...) so drifts in the machine's load hit both; reported: medians
of the last epoch's seconds (``summary.json`` ``epoch_seconds[-1]``: compile, the first epoch's
warm-up and evaluation excluded) and of the training loop, and the user/ours ratios.

``--accuracy`` (issue 18's targets: >= 90% sparsity with >= 97% test accuracy under
mnist_sparse; bf16 and QAT train): full runs of the linen CNN (``FlaxExampleCNN``) and the NNX MLP
(``NNXMLP``, 300 hidden units) of tests/user_models.py with each experiment's own schedule, through the command line.
For each: final test accuracy, sparsity, and whether ``jaxaccel.export.load(workdir, model=...)``
predicts exactly what the trained model predicts (argmax over the whole test set; the trained model
is the run's evaluation model on the final checkpoint's parameters). ``--set key=value`` adds
overrides to every run (e.g. ``train.steps=60`` for a smoke test). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jaxaccel and tests.user_models, also when run as a script

USER_CNN = "tests.user_models:FlaxExampleCNN"
# key -> (label, model.name, overrides of its own). The NNX MLP as wide as LeNet's first layer
# (784-300-10): at its default width of 64, 90% sparsity leaves it 5,100 weights.
MODELS = {"cnn": ("linen CNN", USER_CNN, []),
          "mlp": ("NNX MLP (hidden 300)", "tests.user_models:NNXMLP", ["model.kwargs={hidden: 300}"])}
SPEED_TARGET = 1.3


def cli(exp: str, workdir: Path, *overrides: str) -> dict:
    """One run through the command line; returns its summary (exits on a failed run)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "jaxaccel.run", f"exp={exp}", f"workdir={workdir}", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"exp={exp} {' '.join(overrides)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads((workdir / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# Speed.

def check_same_architecture() -> None:
    """The user's CNN is mnist_cnn's model: same parameter tree, same logits on the same parameters."""
    import jax

    import jaxaccel
    from jaxaccel import paths
    from jaxaccel.models import build_model
    from jaxaccel.plan import with_conv
    from tests.user_models import FlaxExampleCNN

    ours = build_model(with_conv(jaxaccel.experiments.get("mnist_cnn").model, "xla"), 10)
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), np.uint8)
    params = ours.init(jax.random.key(0), images)["params"]
    theirs = FlaxExampleCNN()
    shapes = lambda tree: {k: v.shape for k, v in paths.named_leaves(tree)}
    user_params = theirs.init(jax.random.key(0), images.astype(np.float32) / 255)["params"]
    if shapes(user_params) != shapes(params):
        raise SystemExit(f"FlaxExampleCNN is not mnist_cnn's model: {shapes(user_params)} vs {shapes(params)}")
    np.testing.assert_allclose(theirs.apply({"params": params}, images.astype(np.float32) / 255),
                               ours.apply({"params": params}, images), rtol=1e-5, atol=1e-5)


def speed(rounds: int, epochs: int, extra: list[str]) -> None:
    check_same_architecture()
    runs = {"ours": [], "user": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for which, model in (("ours", []), ("user", [f"model.name={USER_CNN}"])):
                summary = cli("mnist_cnn", Path(tmp) / f"{which}-{r}", *model, "train.steps=null",
                              f"train.epochs={epochs}", *extra)
                runs[which].append((summary["epoch_seconds"][-1] if summary["epoch_seconds"] else float("nan"),
                                    summary["train_seconds"], summary["test_accuracy"]))
                print(f"#   {which} round {r}: last epoch {runs[which][-1][0]:.2f} s, training {runs[which][-1][1]:.2f} s, "
                      f"accuracy {runs[which][-1][2]:.4f}", flush=True)
    med = {w: [statistics.median(t[i] for t in runs[w]) for i in range(3)] for w in runs}
    ratio = med["user"][0] / med["ours"][0]
    print(f"\n# benchmarks/user_model.py: exp=mnist_cnn vs model.name={USER_CNN}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, medians of {rounds} alternating rounds of "
          f"{epochs} epochs{', overrides ' + ' '.join(extra) if extra else ''}\n")
    print("| model | last epoch | training loop | test accuracy | last epochs per run (s) |")
    print("| --- | --- | --- | --- | --- |")
    for which, label in (("ours", "mnist_cnn (model.name=cnn)"), ("user", f"plain linen ({USER_CNN})")):
        e, t, a = med[which]
        print(f"| {label} | {e:.2f} s | {t:.2f} s | {100 * a:.2f}% | {', '.join(f'{x[0]:.2f}' for x in runs[which])} |")
    print(f"\nuser / ours, last epoch: {ratio:.2f}x (target <= {SPEED_TARGET}x: {'met' if ratio <= SPEED_TARGET else 'MISSED'}); "
          f"training loop: {med['user'][1] / med['ours'][1]:.2f}x")


# ---------------------------------------------------------------------------------------------
# Accuracy and the export.

def trained_predictions(workdir: Path, cfg, inputs) -> np.ndarray:
    """Class predictions of the run's evaluation model (the run's precision and QAT) with the
    parameters and model state of the run's final checkpoint."""
    import jax
    import orbax.checkpoint as ocp

    from jaxaccel.models import build_model
    from jaxaccel.plan import with_conv

    with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
        state = manager.restore(manager.latest_step(),
                                args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    model = build_model(with_conv(cfg.model, "xla"), 10, cfg.precision, cfg.quant)
    variables = {"params": state["params"], **(state.get("model_state") or {})}
    apply = jax.jit(lambda v, x: model.apply(v, x))
    return np.concatenate([np.argmax(apply(variables, inputs[i:i + 1000]), -1) for i in range(0, len(inputs), 1000)])


def export_predictions(workdir: Path, model_name: str, inputs) -> tuple[np.ndarray, str]:
    import importlib

    from jaxaccel import export

    module, attribute = model_name.split(":")
    served = export.load(workdir, model=getattr(importlib.import_module(module), attribute))
    return np.concatenate([np.argmax(served(inputs[i:i + 1000]), -1) for i in range(0, len(inputs), 1000)]), served.form


def accuracy(models: list[str], experiments: list[str], extra: list[str]) -> None:
    import jaxaccel
    from jaxaccel import data as data_lib

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            label, name, own = MODELS[key]
            for exp in experiments:
                overrides = [f"model.name={name}", *own, *extra]
                workdir = Path(tmp) / f"{key}-{exp}"
                summary = cli(exp, workdir, *overrides)
                cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(exp), overrides)
                ds = data_lib.load(cfg.data.name, cfg.data.dir, cfg.data.cache_dir)
                trained = trained_predictions(workdir, cfg, ds.test_inputs)
                served, form = export_predictions(workdir, name, ds.test_inputs)
                same = int(np.sum(trained == served))
                recomputed = float(np.mean(trained == ds.test_labels))
                rows.append(f"| {label} | {exp} | {100 * summary['test_accuracy']:.2f}% | {100 * summary['sparsity']:.2f}% | "
                            f"{form} | {same}/{len(trained)}{'' if same == len(trained) else ' DIFFER'} | "
                            f"{100 * recomputed:.2f}% |")
                print(f"#   {rows[-1]}", flush=True)
    print(f"\n# benchmarks/user_model.py --accuracy: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs"
          f"{', overrides ' + ' '.join(extra) if extra else ''}; targets: >= 90% sparsity with >= 97% (mnist_sparse)\n")
    print("| model | experiment | test accuracy | sparsity | export form | export predicts as the trained model "
          "| trained model's accuracy, recomputed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per speed run (the last one is timed)")
    parser.add_argument("--accuracy", action="store_true", help="full runs and export checks instead of speed")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--experiments", nargs="+", default=["mnist_sparse", "mnist_bf16", "mnist_qat"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()
    os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
    if args.accuracy:
        accuracy(args.models, args.experiments, args.set)
    else:
        speed(args.rounds, args.epochs, args.set)


if __name__ == "__main__":
    main()
