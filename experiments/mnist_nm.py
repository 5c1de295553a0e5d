"""LeNet-300-100 with 2:4 structured sparsity on every prunable kernel (the sparse-tensor-core layout).

Command:  python -m jaxaccel.run exp=mnist_nm
Runtime:  ~17 s on a 2-core CPU (15 epochs)
Accuracy: >= 97.9% test at 50% (2:4) sparsity, within 0.3 pp of mnist_mlp (measured 98.20%, mean of 3 seeds: 98.16, 98.19, 98.24)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 15, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
    # Two dense epochs, then 2 of every 4 weights along each kernel's input axis, kept by |w|.
    "sparsity": {"method": "magnitude", "structure": "nm", "n": 2, "m": 4,
                 "schedule": "one_shot", "start": "2 epochs"},
}
