"""Text side: tokenizers and text encoders, behind small interfaces.

A text encoder maps (token ids, segment ids, positions) [B, Lt] to embeddings [B, Lt, out_dim]. The
tiny trainable encoder here serves the procedural captions; pretrained encoders (T5/umT5) plug into the
same registry and may instead be run offline, feeding cached embeddings, or frozen inside the train step
(config.text.encoder = "precomputed" with config.text.path; sora_jax.convert.hf_text.frozen_text_encoder).

Tokenizers (config.text.tokenizer): "words" and "bytes" need nothing but the config; "hf" reads the
Hugging Face tokenizer saved in config.text.tokenizer_path or config.text.path (e.g. umT5's, for a frozen
pretrained encoder).
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.layers.attention import Attention
from sora_jax.layers.common import MLP, norm
from sora_jax.models.t5 import T5Encoder, T5EncoderConfig

PAD, UNK, BOS = 0, 1, 2
_SPECIALS = ("<pad>", "<unk>", "<bos>")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, max_len: int) -> np.ndarray: ...


class WordTokenizer:
    """Lower-cased word-level tokenizer over a fixed vocabulary; a <bos> token starts every caption.

    The leading <bos> means no caption is ever empty, so cross-attention always has a key.
    """

    def __init__(self, vocabulary: Sequence[str]):
        self.words = list(_SPECIALS) + [w for w in vocabulary if w not in _SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    @classmethod
    def from_config(cls, text_cfg) -> "WordTokenizer":
        """Over config.text.vocabulary."""
        return cls(list(text_cfg.vocabulary))

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in self.index]

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """Token ids (<= max_len, truncated at the end), int32."""
        ids = [BOS] + [self.index.get(w, UNK) for w in re.findall(r"[a-z0-9']+", text.lower())]
        if len(ids) > max_len:
            logging.warning("caption %r has %d tokens; truncated to %d.", text, len(ids), max_len)
        return np.asarray(ids[:max_len], np.int32)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258) after a <bos>: any caption, in any language, with no vocabulary
    to build -- what a tiny model trained on a user's own captions needs. `vocabulary` is ignored."""

    def __init__(self, vocabulary: Sequence[str] = ()):
        del vocabulary
        self.vocab_size = len(_SPECIALS) + 256

    @classmethod
    def from_config(cls, text_cfg) -> "ByteTokenizer":
        """Needs nothing from the config."""
        del text_cfg
        return cls()

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """Token ids (<= max_len, truncated at the end), int32."""
        ids = [BOS] + [len(_SPECIALS) + b for b in text.encode("utf-8")]
        if len(ids) > max_len:
            logging.info("caption %r has %d byte tokens; truncated to %d.", text[:40], len(ids), max_len)
        return np.asarray(ids[:max_len], np.int32)


# Truncation settings live in the Rust tokenizer, shared by every HFTokenizer of a path (_hf_tokenizer is cached),
# and a call may change them: grain's reader threads must not interleave their calls.
_HF_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _hf_tokenizer(path: str):
    """The Hugging Face tokenizer in `path`, read once per process (umT5's takes seconds), never downloaded."""
    from transformers import AutoTokenizer  # heavy, and only this tokenizer needs it
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (config.text.path): the one a pretrained text
    encoder was trained with, special tokens included (umT5 ends every caption with </s>).

    `vocabulary` is ignored: the tokenizer brings its own. Captions longer than max_len are truncated by the
    tokenizer itself, which keeps its special tokens (umT5's </s> stays last).
    """

    def __init__(self, path: str):
        import os
        if not path or not os.path.isdir(path):
            raise ValueError(f"config.text.tokenizer='hf' needs config.text.path (or tokenizer_path) = a local "
                             "Hugging Face directory holding the tokenizer files (tokenizer.json or spiece.model); "
                             f"got {path!r}.")
        self.path = path
        self.tokenizer = _hf_tokenizer(path)
        self.vocab_size = len(self.tokenizer)  # added tokens included: every id it can emit

    @classmethod
    def from_config(cls, text_cfg) -> "HFTokenizer":
        """From config.text.tokenizer_path, or config.text.path when that is unset."""
        return cls(hf_tokenizer_path(text_cfg))

    def __getstate__(self):  # grain's worker processes get the path and read the tokenizer themselves (cached)
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """Token ids with the model's special tokens (<= max_len, truncated at the end), int32."""
        with _HF_LOCK:
            full = self.tokenizer(text)["input_ids"]
            ids = full if len(full) <= max_len else self.tokenizer(text, truncation=True, max_length=max_len)[
                "input_ids"]
        if len(full) > max_len:
            logging.info("caption %r has %d tokens; truncated to %d.", text[:40], len(full), max_len)
        return np.asarray(ids, np.int32)


def hf_tokenizer_path(text_cfg) -> str:
    """Where the "hf" tokenizer's files are: config.text.tokenizer_path, else config.text.path (a diffusers
    pipeline keeps them in tokenizer/ beside text_encoder/)."""
    return text_cfg.get("tokenizer_path", "") or text_cfg.get("path", "")


def frozen_encoder_path(text_cfg) -> str:
    """config.text.path when a frozen pretrained encoder (sora_jax.convert.hf_text.frozen_text_encoder) turns the
    batch's caption ids into the features a "precomputed"-text model reads, inside the step; "" otherwise
    (the features, if any, come with the batch)."""
    return text_cfg.get("path", "") if text_cfg.encoder == "precomputed" else ""


# name -> class with from_config(config.text), encode(text, max_len) and vocab_size.
TOKENIZERS = {"words": WordTokenizer, "bytes": ByteTokenizer, "hf": HFTokenizer}


def build_tokenizer(text_cfg) -> Tokenizer:
    """The tokenizer named by config.text.tokenizer (over config.text.vocabulary, or read from config.text.path)."""
    if text_cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"config.text.tokenizer={text_cfg.tokenizer!r}; choose one of {sorted(TOKENIZERS)}.")
    return TOKENIZERS[text_cfg.tokenizer].from_config(text_cfg)


class _EncoderLayer(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, backend: str, block: int, dtype):
        self.norm1 = norm(dim, rngs=rngs)
        self.attn = Attention(dim, heads, rngs=rngs, backend=backend, block=block, dtype=dtype)
        self.norm2 = norm(dim, rngs=rngs)
        self.mlp = MLP(dim, 4 * dim, rngs=rngs, dtype=dtype)

    def __call__(self, x, segments):
        x = x + self.attn(self.norm1(x), segments)
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nnx.Module):
    """A small trainable transformer encoder with learned absolute positions (per caption)."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, max_len: int, *,
                 rngs: nnx.Rngs, backend: str = "xla", block: int = 128, dtype=jnp.float32):
        self.out_dim, self.max_len = dim, max_len
        # Unit-scale word embeddings: at 0.02 (BERT's) the words the loss rewards least (shape, direction in the
        # procedural world) stayed within 2% of each other at the encoder's output after 1,500 steps, so the DiT
        # could never tell them apart (BUILD_NOTES, "caption words the model ignored").
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(1.0), ("vocab", "embed")))
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, dim)), out_sharding=(None, "embed"))
        self.layers = nnx.List([_EncoderLayer(dim, heads, rngs=rngs, backend=backend, block=block, dtype=dtype)
                                for _ in range(depth)])
        self.final_norm = norm(dim, rngs=rngs)

    def __call__(self, ids: jax.Array, segments: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.embed(ids) + jnp.take(self.pos[...], jnp.clip(positions, 0, self.max_len - 1), axis=0)
        for layer in self.layers:
            x = layer(x, segments)
        return self.final_norm(x)


def _tiny(text_cfg, vocab_size: int, *, rngs: nnx.Rngs, backend: str, block: int, dtype) -> nnx.Module:
    return TinyTextEncoder(vocab_size, text_cfg.width, text_cfg.depth, text_cfg.heads, text_cfg.max_len, rngs=rngs,
                           backend=backend, block=block, dtype=dtype)


def _t5(text_cfg, vocab_size: int, *, rngs: nnx.Rngs, backend: str, block: int, dtype,
        per_layer_bias: bool = False) -> nnx.Module:
    """A randomly initialised T5 v1.1 (umT5: per_layer_bias) encoder shaped by config.text: width = d_model,
    depth, heads, and optionally d_kv, d_ff, num_buckets, max_distance. Pretrained weights come from
    sora_jax.convert.load_hf_text_encoder (a model may not import the converters)."""
    del backend, block  # the relative-position bias needs the explicit-bias attention; see models/t5.py
    cfg = T5EncoderConfig(
        vocab_size=vocab_size, d_model=text_cfg.width, d_kv=text_cfg.get("d_kv", text_cfg.width // text_cfg.heads),
        num_heads=text_cfg.heads, d_ff=text_cfg.get("d_ff", 4 * text_cfg.width), num_layers=text_cfg.depth,
        num_buckets=text_cfg.get("num_buckets", 32), max_distance=text_cfg.get("max_distance", 128),
        per_layer_bias=per_layer_bias)
    return T5Encoder(cfg, rngs=rngs, dtype=dtype)


# Builders: fn(config.text, vocab_size, *, rngs, backend, block, dtype) -> encoder with `out_dim`.
TEXT_ENCODERS = {"tiny": _tiny, "t5": _t5, "umt5": functools.partial(_t5, per_layer_bias=True)}


def build_text_encoder(text_cfg, vocab_size: int, *, rngs: nnx.Rngs, backend: str, block: int = 128,
                       dtype=jnp.float32) -> nnx.Module:
    """The encoder named by config.text.encoder, computing in `dtype` with attention `backend`."""
    if text_cfg.encoder not in TEXT_ENCODERS:
        raise ValueError(f"config.text.encoder={text_cfg.encoder!r}; choose one of {sorted(TEXT_ENCODERS)}.")
    return TEXT_ENCODERS[text_cfg.encoder](text_cfg, vocab_size, rngs=rngs, backend=backend, block=block, dtype=dtype)
