"""LeNet-300-100 with channel shrinking: 60% of the first hidden layer's units pruned (L2 norm of
their weights) half an epoch in, then removed; the rest of the run trains a 784-120-100-10 MLP
(0.40x the parameters), with a one-cycle learning rate and label smoothing, for 7 epochs.

Command:  python -m jaxaccel.run exp=mnist_mlp_shrink
Runtime:  training 5.1 s on a 2-core CPU (median of 3; mnist_mlp 9.8 s side by side: 0.52x; benchmarks/surgery_speed.py)
Accuracy: >= 98.0% test (measured 98.32%, mean of 3 seeds: 98.34, 98.32, 98.31; 98.36% in 8 epochs,
          98.37% in 10)

Only the first layer shrinks: it holds 88% of the MLP's multiply-adds. The recipe is not
mnist_mlp's (cosine Adam 1e-3): with it, 784-150-50 reached 97.69% and 784-150-100 98.00%;
benchmarks/time_to_accuracy.py separates what the shrink buys from what the recipe buys.
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "mlp", "features": [300, 100]},
    "train": {"epochs": 7, "batch_size": 128, "label_smoothing": 0.1},
    "optim": {"name": "adam", "learning_rate": 3e-3, "schedule": "onecycle"},
    # One mask update (one_shot) half an epoch in, then the shrink of Dense_0 alone.
    "sparsity": {"method": "magnitude", "structure": "channel", "target": 0.6, "schedule": "one_shot",
                 "start": "0.5 epochs", "shrink": True, "exclude": ["^Dense_[12]/"]},
}
