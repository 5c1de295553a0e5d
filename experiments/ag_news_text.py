"""Text classification of AG News (4 topics): hashed-word tokens, 1-D conv encoder, max pool.

Command:  python -m jaxaccel.run exp=ag_news_text
Runtime:  not measured here: ag_news_subset is not prepared on the dev machine and cannot be downloaded there (3 epochs over 120k news items)
Accuracy: not measured here: dataset not available on the dev machine; tests/test_applications.py runs the whole pipeline on TFDS mock data

Tokens: title and description, lower-cased words hashed into model.vocab_size ids (jaxaccel.text),
cut or padded to data.max_length=128, tokenized once when the dataset is cached. Prepare the data with
`pip install 'jaxaccel[prepare]' && tfds build ag_news_subset --data_dir DIR --file_format array_record`.
"""

config = {
    "data": {"name": "ag_news_subset", "max_length": 128},
    "model": {"name": "text_cnn", "width": 64, "depth": 2, "vocab_size": 32768},
    "train": {"epochs": 3, "batch_size": 128},
    "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine"},
}
