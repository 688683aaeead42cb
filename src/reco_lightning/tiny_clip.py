"""Build small CLIP, SigLIP and SigLIP 2 backbones offline, in the exact on-disk layout of a hub checkpoint.

No model hub is reachable on CI or on the demo machine, so tests and the demo create their own backbone:
a tokenizer learned on the captions in milliseconds (CLIP's byte-level BPE with ``</w>``; a SigLIP-style
Unigram over lower-cased, punctuation-free words; SigLIP 2's Gemma-style BPE with byte fallback), a
config of any size, and ``save_pretrained``. Everything downstream then loads it with
``from_pretrained(directory)``, the same path a user takes with ``openai/clip-vit-base-patch32`` or
``google/siglip-base-patch16-224``. The random weights are seeded and the tokenizers deterministic, so
two builds of the same backbone are byte-identical.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import pre_tokenizers

from reco_lightning.atomic import replace_directory

__all__ = [
    "TINY_FAMILIES",
    "build_clip_tokenizer",
    "build_siglip2_tokenizer",
    "build_siglip_tokenizer",
    "new_clip",
    "save_clip",
    "save_tiny_backbone",
    "save_tiny_clip",
    "tiny_clip_config",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _learn_merges(
    word_counts: Counter[str], split: Callable[[str], list[str]], max_merges: int
) -> list[tuple[str, str]]:
    """The classic BPE loop over ``word_counts`` (each word split into symbols by ``split``), ties broken
    by the pair itself so that every process learns the same merges (the ``tokenizers`` trainer does not)."""
    words = {w: split(w) for w in sorted(word_counts)}
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
    return merges


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
    merges = _learn_merges(word_counts, lambda w: [*w[:-1], w[-1] + "</w>"], max_merges)
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
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
    return _save_atomically(directory, model, processor)


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


# --- SigLIP and SigLIP 2 ------------------------------------------------------------------------------
#: the families :func:`save_tiny_backbone` builds
TINY_FAMILIES = ("clip", "siglip", "siglip2")
_PUNCTUATION = r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]"


def build_siglip_tokenizer(texts: Iterable[str], max_length: int = 16):
    """A SigLIP-style tokenizer without sentencepiece: a ``tokenizers`` Unigram over the captions' words.

    As SiglipTokenizer: text lower-cased with punctuation stripped, ``▁``-prefixed words, ``</s>`` ends
    every sequence, pad = eos = ``</s>``, right padding, no attention mask among the model inputs (the
    hub's SigLIP tokenizers return none). The vocabulary is written out, not trained: every process
    gets the same ids. Whole words score above their letters, which any unknown word falls back to.
    """
    import math

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(_PUNCTUATION), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    words = Counter(w for text in texts for w in normalizer.normalize_str(text).split())
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789") | {c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [(c, -10.0) for c in chars] + [("\u2581" + c, -10.0) for c in chars]
    known, total = {p for p, _ in pieces}, sum(words.values())
    pieces += [("\u2581" + w, math.log(words[w] / total)) for w in sorted(words) if "\u2581" + w not in known]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
        model_input_names=["input_ids"],
    )


def build_siglip2_tokenizer(texts: Iterable[str], max_length: int = 16, max_merges: int = 2000):
    """A Siglip2Tokenizer (Gemma-style BPE: ``▁`` for spaces, byte fallback, lower-case) learned on ``texts``,
    configured as the hub's SigLIP 2 checkpoints are: no bos, eos appended, right padding, no attention
    mask among the model inputs (transformers' defaults for the class are left padding and no eos)."""
    from transformers import Siglip2Tokenizer

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    units: Counter[str] = Counter()
    for text in texts:
        for i, word in enumerate(text.lower().split(" ")):
            units["\u2581" + word if i else word] += 1  # Gemma: no dummy prefix on the first word
    for char in sorted({c for unit in units for c in unit} | set("abcdefghijklmnopqrstuvwxyz0123456789")):
        vocab.setdefault(char, len(vocab))
    merges = _learn_merges(units, list, max_merges)
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    return Siglip2Tokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=False,
        add_eos_token=True,
        padding_side="right",
        model_input_names=["input_ids"],
        model_max_length=max_length,
    )


def _save_atomically(directory: Path, *parts) -> Path:
    """``save_pretrained`` of each part into a temp dir renamed into place: never a half-written backbone."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        for part in parts:
            part.save_pretrained(tmp)
        replace_directory(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def save_tiny_backbone(
    directory: str | os.PathLike,
    captions: Iterable[str],
    family: str = "clip",
    seed: int = 0,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    max_text_len: int = 16,
) -> Path:
    """A random tiny backbone of ``family`` (:data:`TINY_FAMILIES`) with a tokenizer learned on ``captions``,
    saved in hub layout (model, tokenizer, image processor); returns the directory."""
    import torch

    captions = list(captions)
    if family == "clip":
        return save_tiny_clip(
            directory,
            captions,
            seed=seed,
            embed_dim=width,
            text_width=width,
            vision_width=width,
            layers=layers,
            heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            max_text_len=max_text_len,
        )
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny backbone family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    tower = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    if family == "siglip":
        from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

        tokenizer = build_siglip_tokenizer(captions, max_text_len)
        make_config, make_model = SiglipConfig, SiglipModel
        vision = {**tower, "image_size": image_size, "patch_size": patch_size}
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

        tokenizer = build_siglip2_tokenizer(captions, max_text_len)
        make_config, make_model = Siglip2Config, Siglip2Model
        patches = (image_size // patch_size) ** 2  # a square position grid, as NaFlex interpolates it
        vision = {**tower, "patch_size": patch_size, "num_patches": patches}
        image_processor = Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=patches)
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_text_len,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    torch.manual_seed(seed)
    model = make_model(make_config(text_config=text, vision_config=vision))
    return _save_atomically(Path(directory), model, tokenizer, image_processor)
