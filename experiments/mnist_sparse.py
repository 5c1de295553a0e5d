"""LeNet-300-100 pruned to 90% sparsity by gradual magnitude pruning (Zhu & Gupta cubic schedule).

Command:  python -m jaxaccel.run exp=mnist_sparse
Runtime:  ~25 s on a 2-core CPU (20 epochs)
Accuracy: >= 98.2% test at >= 90% sparsity (measured 98.30%, mean of 3 seeds: 98.20, 98.31, 98.38; Han et al. 2015: 98.41% at ~92%)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 20, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
    # Fractions of the run, so a shorter run prunes too: steps 1000 and 6000 of the 9360 at batch 128
    # (the schedule the numbers above were measured with); masks updated every 100 steps.
    "sparsity": {
        "method": "magnitude", "structure": "unstructured", "target": 0.9,
        "schedule": "polynomial", "start": "10.69%", "end": "64.11%", "update_every": 100,
    },
}
