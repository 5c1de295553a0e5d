"""The flax-example CNN (conv32-conv64-dense256-dense10, avg-pooled) on MNIST: the speed reference.

Command:  python -m jaxaccel.run exp=mnist_cnn
Runtime:  ~95 s on a 2-core CPU (4 epochs, warm caches; 80 s of training)
Accuracy: >= 99.0% test (measured 99.09% with the default model.conv=im2col; 99.05% with
          model.conv=xla, which took ~175 s)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "cnn"},
    "train": {"epochs": 4, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
}
