"""Reference models: pure ``apply_fn(params, batch)`` + pure-dict params.

``mlp``, ``cnn`` (ResNet-20-style 1-D), ``transformer`` (pre-LN, GQA, RoPE) are flax NNX modules
split into pure functions; ``bert``/``load_minilm`` is a pure-JAX BERT with the real
all-MiniLM-L6-v2 weights. ``train_mnist1d`` trains any of them on MNIST-1D.
"""

from .base import Model, from_nnx
from .bert import BertConfig, MiniLM, bert_apply, load_minilm, sentence_embedding
from .cnn import cnn
from .mlp import mlp
from .transformer import transformer
from .recipes import MNIST1D_MLP, TrainedModel, train_mnist1d

__all__ = ["Model", "from_nnx", "mlp", "cnn", "transformer", "BertConfig", "MiniLM", "bert_apply", "load_minilm",
           "sentence_embedding", "MNIST1D_MLP", "TrainedModel", "train_mnist1d"]
