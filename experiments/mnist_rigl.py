"""LeNet-300-100 trained sparse from scratch with RigL at a constant 90% sparsity (ERK layer mix).

Command:  python -m jaxaccel.run exp=mnist_rigl
Runtime:  ~31 s on a 2-core CPU (20 epochs)
Accuracy: >= 97.8% test at 90% sparsity (measured 98.06%, mean of 3 seeds: 97.89, 98.13, 98.15)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 20, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
    # Drop the weakest 30% (cosine-decayed) and regrow by |gradient| every 100 steps until 75%.
    "sparsity": {"method": "rigl", "target": 0.9, "distribution": "erk", "drop_fraction": 0.3,
                 "update_every": 100, "start": 0},
}
