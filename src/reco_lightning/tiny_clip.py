"""Build small CLIP backbones offline, in the exact on-disk layout of a hub checkpoint.

No model hub is reachable on CI or on the demo machine, so tests and the demo create their own CLIP:
a byte-level BPE tokenizer trained on the captions in milliseconds, a ``CLIPConfig`` of any size,
and ``save_pretrained``. Everything downstream then loads it with ``from_pretrained(directory)``,
the same path a user takes with ``openai/clip-vit-base-patch32``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import pre_tokenizers

from reco_lightning.atomic import replace_directory

__all__ = ["build_clip_tokenizer", "new_clip", "save_clip", "save_tiny_clip", "tiny_clip_config"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(texts: Iterable[str], max_merges: int = 2000):
    """A CLIP BPE tokenizer learned on ``texts``, identical in every process for the same texts.

    The ``tokenizers`` trainer breaks ties between equally frequent pairs differently from one process
    to the next; on templated captions every class name is equally frequent, so token ids (and the
    weights trained on them) changed between two builds. Here the classic BPE loop runs in Python with
    ties broken by the pair itself. Same normalizer, byte-level pre-tokenizer and ``</w>`` suffix as
    CLIP; all 256 byte symbols (alone and word-final) are in the vocabulary, so any string tokenizes.
    On a small caption corpus the loop ends when every word is a single token.
    """
    from transformers import CLIPTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        reference = CLIPTokenizer()  # empty vocab; only its normalizer/pre-tokenizer are borrowed
    finally:
        hf_logging.set_verbosity(verbosity)
    normalizer = reference.backend_tokenizer.normalizer
    pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in [*alphabet, *(a + "</w>" for a in alphabet)]:
        vocab.setdefault(symbol, len(vocab))
    words = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(word_counts)}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, pieces in words.items():
            for pair in itertools.pairwise(pieces):
                pairs[pair] += word_counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, pieces in words.items():
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            words[word] = merged
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
        replace_directory(tmp, directory)
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
    max_merges: int = 2000,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """Tokenizer trained on ``captions`` + random tiny CLIPModel, saved in hub layout; returns the directory."""
    tokenizer = build_clip_tokenizer(captions, max_merges=max_merges)
    return save_clip(directory, new_clip(tokenizer, seed=seed, **config_kwargs), tokenizer)
