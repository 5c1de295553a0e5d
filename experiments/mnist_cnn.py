"""The flax-example CNN (conv32-conv64-dense256-dense10, avg-pooled) on MNIST: the speed reference.

Command:  python -m jaxaccel.run exp=mnist_cnn
Runtime:  ~86 s on a 2-core CPU (4 epochs, warm caches; 77 s of training; 86 and 113 s measured)
Accuracy: >= 99.0% test (measured 99.04% twice with the default model.conv=im2col; 99.05% with
          model.conv=xla, which took ~175 s, measured with an earlier data order)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "cnn"},
    "train": {"epochs": 4, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
}
