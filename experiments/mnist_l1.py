"""LeNet-300-100 made sparse by an L1 penalty, then near-zeros thresholded to exact, frozen zeros.

Command:  python -m jaxaccel.run exp=mnist_l1
Runtime:  ~21 s on a 2-core CPU (20 epochs)
Accuracy: >= 97.5% test at >= 80% sparsity (measured 98.47% at 84.7%)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 20, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
    "sparsity": {"penalty": "l1", "penalty_weight": 2e-5, "threshold": 0.01},
}
