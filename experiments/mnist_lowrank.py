"""LeNet-300-100 factored to rank 48 by truncated SVD after 3 dense epochs (low-rank factorization),
with a one-cycle learning rate and label smoothing.

Command:  python -m jaxaccel.run exp=mnist_lowrank
Runtime:  training 6.4 s on a 2-core CPU (median of 3; mnist_mlp 8.8 s side by side; 1.86x faster per step after the factorization; benchmarks/surgery_speed.py)
Accuracy: >= 98.0% test with 0.27x the dense parameters (measured 98.62%, mean of 3 seeds: 98.64,
          98.57, 98.66); with ``quant.mode=ptq`` its int8 export holds 75,896 bytes of arrays, 14x
          less than dense fp32's 1,066,440, at 98.57% (seed 0; 98.62% before quantizing)

The recipe is not mnist_mlp's (cosine Adam 1e-3; with it, rank 48 after 3 of 12 epochs reached
98.03%, seed 0); benchmarks/time_to_accuracy.py separates what the factorization buys from what
the recipe buys.
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 10, "batch_size": 128, "label_smoothing": 0.1},
    "optim": {"name": "adam", "learning_rate": 3e-3, "schedule": "onecycle"},
    # 784x300 -> 784x48 @ 48x300 and 300x100 -> 300x48 @ 48x100; the 100x10 classifier is not
    # selected (rank 48 would not save FLOPs there anyway). 72,642 parameters: 0.27x the dense 266,610.
    "lowrank": {"rank": 48, "include": [r"Dense_[01]/kernel"], "at": "3 epochs"},
}
