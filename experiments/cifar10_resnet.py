"""ResNet-20 (group norm) on CIFAR-10 with random crop (pad 4) and flip augmentation on device.

Command:  python -m jaxaccel.run exp=cifar10_resnet
Runtime:  not measured here: CIFAR-10 is not prepared on the dev machine and cannot be downloaded there (30 epochs of a 272k-parameter ResNet; expect hours on a 2-core CPU)
Accuracy: not measured here: dataset not available on the dev machine; tests/test_applications.py runs the whole pipeline on TFDS mock data (ResNet-20 papers report ~91-92% with batch norm; this run has not been measured)

Prepare the data once where TensorFlow and internet are available:
`pip install 'jaxaccel[prepare]' && tfds build cifar10 --data_dir DIR --file_format array_record`.
"""

config = {
    "data": {"name": "cifar10"},
    "model": {"name": "resnet", "width": 16, "depth": 3},
    "augment": {"crop_padding": 4, "flip": True},
    "train": {"epochs": 30, "batch_size": 128},
    "optim": {"name": "momentum", "learning_rate": 0.1, "schedule": "warmup_cosine", "warmup": "1 epoch",
              "weight_decay": 5e-4},
}
