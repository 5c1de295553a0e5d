"""Keyword spotting on Speech Commands (12 classes): log-mel features computed on device, small CNN.

Command:  python -m jaxaccel.run exp=speech_commands_kws
Runtime:  not measured here: speech_commands is not prepared on the dev machine and cannot be downloaded there (10 epochs over 85k one-second clips)
Accuracy: not measured here: dataset not available on the dev machine; tests/test_applications.py runs the whole pipeline on TFDS mock data

Clips are int16, cut or zero-padded to 1 s (16000 samples) when cached; the model computes 40-band
log-mel energies of 25 ms frames every 10 ms (jaxaccel.audio) inside the compiled step. Preparing
the data needs TensorFlow (`pip install 'jaxaccel[prepare]' && tfds build speech_commands --data_dir DIR
--file_format array_record`); reading it does not.
"""

config = {
    "data": {"name": "speech_commands", "max_length": 16000},
    "model": {"name": "kws_cnn", "width": 16, "depth": 3},
    "train": {"epochs": 10, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
}
