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
    "sparsity": {
        "method": "magnitude", "structure": "unstructured", "target": 0.9,
        "schedule": "polynomial", "start_step": 1000, "end_step": 6000, "update_every": 100,
    },
}
