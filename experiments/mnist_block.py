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
    # Fractions of the run, so a shorter run prunes too: steps 1000 and 6000 of the 9360 at batch 128
    # (the schedule the numbers above were measured with); masks updated every 100 steps.
    "sparsity": {"method": "magnitude", "structure": "block", "block": [4, 4], "target": 0.8,
                 "schedule": "polynomial", "start": "10.69%", "end": "64.11%", "update_every": 100},
}
