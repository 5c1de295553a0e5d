"""Text classification: ``model.name=text_cnn`` over hashed-word token ids."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp
from pydantic import Field, StrictInt

from jaxaccel import precision as prec
from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import Classifier, layer_kw
from jaxaccel.schema import PositiveInt

__all__ = ["TextCNNConfig", "TextCNN"]


class TextCNNConfig(ModelConfig):
    """Token embedding, 1-D convolutions, max over the tokens."""
    name: Literal["text_cnn"] = "text_cnn"
    inputs: ClassVar[tuple[str, int, str]] = ("int32", 1, "tokens [N, L]")
    width: PositiveInt = Field(16, description="Embedding and conv channels.")
    depth: PositiveInt = Field(3, description="Conv layers.")
    vocab_size: StrictInt = Field(32768, ge=16, description="Hashed word vocabulary of the tokenizer (the embedding's rows).")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return TextCNN(num_classes=num_classes, width=self.width, depth=self.depth, vocab_size=self.vocab_size,
                       precision=precision, quant=quant)


class TextCNN(Classifier):
    """Token ids [N, L] (0 = padding) -> embedding (``width``) -> ``depth`` 1-D convolutions of
    width 5 with ReLU -> max over the real tokens -> Dense."""
    vocab_size: int = 32768

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        dtype = prec.DTYPES[self.precision.compute] if self.precision else jnp.float32
        x = nn.Embed(self.vocab_size, self.width, dtype=dtype, name="Embed_0")(tokens)
        for i in range(self.depth):
            name = f"Conv_{i}"
            x = nn.relu(nn.Conv(self.width, (5,), name=name, **layer_kw(self, "conv", name, quant_enabled))(x))
        # ReLU outputs are >= 0, so zeroing the padding positions leaves the max over real tokens.
        x = jnp.max(jnp.where((tokens != 0)[..., None], x, 0), axis=1)
        return self._head(x, quant_enabled)
