"""The mnist_cnn workload with low-rank factorization: after a quarter epoch, Conv_1 (77.8% of the
multiply-adds) is factored to rank 16 (a 3x3 conv to 16 channels, then a 1x1 conv to 64) and
Dense_0 (97.4% of the parameters) to rank 32 by truncated SVD; the rest of the run trains the
factors, with mnist_cnn_shrink's recipe (one-cycle learning rate, one-pixel shifts, 2 epochs).

Command:  python -m jaxaccel.run exp=mnist_cnn_lowrank
Runtime:  ~2 min on a 2-core CPU (2 epochs)
Accuracy: >= 99.0% test with 0.14x mnist_cnn's parameters (measured 99.15%, mean of 3 seeds: 99.14, 99.23, 99.07)

After the factorization the model does 0.31x mnist_cnn's multiply-adds per example with 0.14x its
parameters (117,386 of 824,458).
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "cnn"},
    "train": {"epochs": 2, "batch_size": 128},
    "augment": {"crop_padding": 1},
    "optim": {"name": "adam", "learning_rate": 5e-3, "schedule": "onecycle"},
    "lowrank": {"rank": {"Conv_1": 16, "Dense_0": 32}, "include": [r"^(Conv_1|Dense_0)/kernel$"],
                "at": "0.25 epochs"},
}
