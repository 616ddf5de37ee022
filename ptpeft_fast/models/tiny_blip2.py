"""``tiny-blip2``: a real ``Blip2ForConditionalGeneration`` (OPT language model) built from
a small config, with a word-level tokenizer over the synthetic-shapes vocabulary.

Nothing is downloaded: the tokenizer is built with ``tokenizers`` and wrapped in
``PreTrainedTokenizerFast``; the processor is transformers' own ``Blip2Processor`` (which
prepends ``num_query_tokens`` ``<image>`` tokens that the model replaces with the
Q-Former outputs, as in transformers 5), so tiny-blip2 goes through the same code path
as a real BLIP-2 checkpoint and can be ``save_pretrained`` / ``from_pretrained``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig, PreTrainedTokenizerFast

from ..data import synthetic

try:  # transformers 5 names the torchvision-free image processor explicitly
    from transformers import BlipImageProcessorPil as BlipImageProcessor
except ImportError:  # pragma: no cover
    from transformers import BlipImageProcessor

# A larger Q-Former init than 0.02 lets the image signal survive its LayerNorms from the
# start; with 0.02 the tiny LM learns the caption prior first and never looks at the image.
QFORMER_INIT = 0.1

SPECIALS = ["<pad>", "<unk>", "</s>", "<image>"]  # ids 0..3; OPT uses </s> as BOS and EOS

DEFAULT_SIZE = dict(hidden=64, layers=2, heads=4, vision_layers=2, qformer_layers=1,
                    num_query_tokens=8, image_size=32, patch_size=8)


def build_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer (lower-cased, split on whitespace and punctuation, BOS
    ``</s>`` prepended as OPT does), left padding for batched generation."""
    words = list(words) if words is not None else synthetic.vocabulary()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    # special tokens are matched before pre-tokenisation, so "<image><image>" (what
    # processors write) stays whole instead of being split at the angle brackets
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 32,
                    num_query_tokens: int = 8) -> Blip2Processor:
    """``Blip2Processor`` with a ``BlipImageProcessor`` at ``image_size``."""
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor=ip, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def build_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                 vision_layers: int = 2, qformer_layers: int = 1, num_query_tokens: int = 8,
                 image_size: int = 32, patch_size: int = 4, image_token_id: int = 3) -> Blip2Config:
    """A small BLIP-2 config (dropout off everywhere so runs are exactly reproducible)."""
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                  attention_dropout=0.0,
                  # Blip2VisionConfig defaults to initializer_range=1e-10 (real checkpoints always
                  # load EVA-CLIP weights); from scratch that gives a blind, all-zero vision tower
                  initializer_range=0.02)
    qformer = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=qformer_layers,
                   num_attention_heads=heads, encoder_hidden_size=hidden, cross_attention_frequency=1,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, vocab_size=vocab_size,
                   initializer_range=QFORMER_INIT)
    text = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     ffn_dim=4 * hidden, num_attention_heads=heads, max_position_embeddings=128,
                     word_embed_proj_dim=hidden, pad_token_id=0, bos_token_id=2, eos_token_id=2,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                       num_query_tokens=num_query_tokens, image_token_index=image_token_id)


def build_tiny_blip2(seed: int = 0, **size) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A freshly initialised tiny-blip2 and its processor (deterministic for ``seed``)."""
    s = {**DEFAULT_SIZE, **size}
    tok = build_tokenizer()
    proc = build_processor(tok, s["image_size"], s["num_query_tokens"])
    cfg = build_config(len(tok), s["hidden"], s["layers"], s["heads"], s["vision_layers"],
                       s["qformer_layers"], s["num_query_tokens"], s["image_size"], s["patch_size"],
                       image_token_id=tok.convert_tokens_to_ids("<image>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(cfg)
        # transformers leaves query_tokens at zero (checkpoints overwrite them); LAVIS
        # initialises them N(0, 0.02): identical queries would attend identically
        torch.nn.init.normal_(model.query_tokens, std=0.02)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 2
    return model.eval(), proc
