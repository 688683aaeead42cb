"""Build small CLIP backbones offline, in the exact on-disk layout of a hub checkpoint.

No model hub is reachable on CI or on the demo machine, so tests and the demo create their own CLIP:
a byte-level BPE tokenizer trained on the captions in milliseconds, a ``CLIPConfig`` of any size,
and ``save_pretrained``. Everything downstream then loads it with ``from_pretrained(directory)``,
the same path a user takes with ``openai/clip-vit-base-patch32``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

__all__ = ["build_clip_tokenizer", "new_clip", "save_clip", "save_tiny_clip", "tiny_clip_config"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a CLIP-compatible BPE (same normalizer, pre-tokenizer, ``</w>`` suffix) on ``texts``.

    The initial alphabet is all 256 byte symbols, so any input string tokenizes without unknowns.
    """
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer()  # empty vocab; only its normalizer/pre-tokenizer are borrowed
    backend = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.normalizer = reference.backend_tokenizer.normalizer
    backend.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    for symbol in pre_tokenizers.ByteLevel.alphabet():  # a one-symbol word ("!") is looked up as "!</w>"
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip_config(
    vocab_size: int,
    embed_dim: int = 32,
    text_width: int = 32,
    vision_width: int = 32,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    max_text_len: int = 16,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 1,
):
    """A CLIPConfig small enough to train on two CPU cores; token ids must lie inside the vocab."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_text_len,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": 4 * vision_width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def save_clip(directory: str | os.PathLike, model, tokenizer) -> Path:
    """Write ``model`` + ``tokenizer`` + a matching image processor to ``directory`` atomically.

    A reader never sees a half-written backbone: files go to a temp dir that is renamed into place.
    """
    from transformers import CLIPImageProcessor, CLIPProcessor

    directory = Path(directory)
    image_size = model.config.vision_config.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def new_clip(tokenizer, seed: int = 0, **config_kwargs):
    """A randomly initialised CLIPModel whose text tower matches ``tokenizer``."""
    import torch
    from transformers import CLIPModel

    config = tiny_clip_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def save_tiny_clip(
    directory: str | os.PathLike,
    captions: Iterable[str],
    vocab_size: int = 512,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """Tokenizer trained on ``captions`` + random tiny CLIPModel, saved in hub layout; returns the directory."""
    tokenizer = build_clip_tokenizer(captions, vocab_size=vocab_size)
    return save_clip(directory, new_clip(tokenizer, seed=seed, **config_kwargs), tokenizer)
