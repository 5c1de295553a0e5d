"""The flax-example CNN (conv32-conv64-dense256-dense10, avg-pooled) on MNIST: the speed reference.

Command:  python -m jaxaccel.run exp=mnist_cnn
Runtime:  ~175 s on a 2-core CPU (4 epochs; a first run adds ~10 s of compilation)
Accuracy: >= 99.0% test (measured 99.05%)

(Runtime and accuracy were measured with model.conv=xla, before im2col became the default; the
lowering computes the same convolution to float rounding, checked in tests/test_conv_lowering.py.)
"""

config = {
    "data": {"name": "mnist"},
    "model": {"name": "cnn"},
    "train": {"epochs": 4, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
}
