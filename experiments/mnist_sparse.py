"""LeNet-300-100 with gradual magnitude pruning to 90% sparsity (not available yet).

Command:  python -m jaxaccel.run exp=mnist_sparse
Runtime:  n/a until the sparsity work lands
Accuracy: n/a
"""

unavailable = ("sparsity is not implemented yet, and this experiment refuses to train a dense "
               "model in its place; use exp=mnist_mlp for the dense baseline")
config = {"model": {"name": "mlp", "features": [300, 100]}}
