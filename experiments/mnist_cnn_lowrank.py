"""The mnist_cnn workload with low-rank factorization: after a quarter epoch, Conv_1 (77.8% of the
multiply-adds) is factored to rank 16 (a 3x3 conv to 16 channels, then a 1x1 conv to 64) and
Dense_0 (97.4% of the parameters) to rank 32 by truncated SVD; the rest of the run trains the
factors, with mnist_cnn_shrink's recipe (one-cycle learning rate, one-pixel shifts, 2 epochs).

Command:  python -m jaxaccel.run exp=mnist_cnn_lowrank
Runtime:  training 34.8 s on a 2-core CPU (median of 3; mnist_cnn 97.3 s side by side; 1.48x faster per step after the factorization; benchmarks/surgery_speed.py)
Accuracy: >= 99.0% test with 0.14x mnist_cnn's parameters (measured 99.15%, mean of 3 seeds: 99.14, 99.23, 99.07)

After the factorization the model does 0.31x mnist_cnn's multiply-adds per example with 0.14x its
parameters (117,386 of 824,458); per step it is 1.48x faster, not 3.2x (the 1x1 conv is a second
pass over the feature maps), and its export infers no faster than mnist_cnn's at batch 128
(benchmarks/README.md). The recipe is mnist_cnn_shrink's, not mnist_cnn's.
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
