"""LeNet-300-100 (784-300-100-10, dense, fp32) on MNIST with Adam and a cosine schedule.

Command:  python -m jaxaccel.run exp=mnist_mlp
Runtime:  ~12 s on a 2-core CPU (10 epochs; whole command, warm caches; 7 s of training)
Accuracy: >= 98.0% test (measured 98.22%, mean of 3 seeds: 98.13, 98.17, 98.35)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 10, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
}
