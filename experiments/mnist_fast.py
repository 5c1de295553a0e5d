"""Time to 99% on MNIST: a small CNN (3x3 convs of 16 and 32 channels) with a one-cycle schedule.

Command:  python -m jaxaccel.run exp=mnist_fast
Runtime:  ~15 s on a 2-core CPU (whole command, warm caches)
Accuracy: >= 99.0% test
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "small_cnn", "channels": [16, 32], "features": []},
    "train": {"epochs": 2, "batch_size": 256},
    "optim": {"name": "adam", "learning_rate": 5e-3, "schedule": "onecycle"},
}
