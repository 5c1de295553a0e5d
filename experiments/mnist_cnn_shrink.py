"""The mnist_cnn workload with channel shrinking: half the channels and units of every hidden layer
pruned (L2 norm of the filter) a quarter epoch in, then removed; the rest of the run trains the
narrower dense CNN (conv16-conv32-dense128: 0.25x the parameters), with a one-cycle learning rate
and one-pixel shifts, for 2 epochs.

Command:  python -m jaxaccel.run exp=mnist_cnn_shrink
Runtime:  training 25.5 s on a 2-core CPU (median of 3; mnist_cnn 104.7 s side by side: 0.24x; benchmarks/surgery_speed.py)
Accuracy: >= 99.0% test (measured 99.12%, mean of 3 seeds: 99.17, 99.09, 99.10)

The shrink removes exactly what the masks zeroed (biases are masked with their units), so the
narrow model computes the masked wide model's logits (tests/test_shrink.py). The recipe is not
mnist_cnn's (cosine Adam 1e-3, 4 epochs, no shifts): with it the narrow CNN reached 98.83% in
4 epochs; benchmarks/time_to_accuracy.py separates what the shrink buys from what the recipe buys.
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "cnn"},
    "train": {"epochs": 2, "batch_size": 128},
    "augment": {"crop_padding": 1},
    "optim": {"name": "adam", "learning_rate": 5e-3, "schedule": "onecycle"},
    # One mask update (one_shot) a quarter epoch in, then the shrink; the logits layer keeps its 10 units.
    "sparsity": {"method": "magnitude", "structure": "channel", "target": 0.5, "schedule": "one_shot",
                 "start": "0.25 epochs", "shrink": True, "exclude": ["^Dense_1/"]},
}
