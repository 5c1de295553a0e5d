"""LeNet-300-100 with 4x4 block sparsity at 80%, gradual magnitude (block L2 norm) pruning.

Command:  python -m jaxaccel.run exp=mnist_block
Runtime:  ~29 s on a 2-core CPU (20 epochs)
Accuracy: >= 97.8% test at >= 79.9% sparsity (80% of the 4x4 blocks; measured 98.22%)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 20, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
    "sparsity": {"method": "magnitude", "structure": "block", "block": [4, 4], "target": 0.8,
                 "schedule": "polynomial", "start_step": 1000, "end_step": 6000, "update_every": 100},
}
