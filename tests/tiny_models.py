"""Tiny randomly initialised models, saved as local model folders, for the fast test tier.

A 2-layer BERT and a 2-layer Llama (hidden 64), each with a tokenizer trained
in memory on a few sentences: built from transformers configs, nothing downloaded. They run
the same code as the packaged models (model.name may be any local folder, see
fed_dp_lora.models.model_source): PEFT LoRA, the fused per-sample path and the Opacus
fallback, bitsandbytes 4/8-bit. What needs real weights (what a model learns, the exact
packaged layout) stays on the packaged MiniLM and SmolLM2 in the `slow` tier.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# Every character of the credit texts, in first and in later position of a word, so that the
# WordPiece tokenizer never needs [UNK].
_ALPHABET = string.ascii_letters + string.digits
CORPUS = [
    "fixed job, no prior default records, 5 years seniority, age 30, married, home owner.",
    "Income 120 (medium), expenses 60, assets 4000, debt 0. Loan 800 for price 1200 "
    "(medium ratio) over 36 months.",
    "freelance job, has prior default records, 1 years seniority, age 52, single, home rent.",
    "partime job, others, parents, priv, ignore, unknown, low, high, good, bad, savings.",
    "applicant aged 27 with fixed job asks 911 for 12 months and has savings",
    "Loan applicant: Will this applicant repay (good) or default (bad)?",
    "What does APR stand for? Annual percentage rate. Is a debt ratio of 80% risky? Yes, it is high.",
    "x" + _ALPHABET + " y" + _ALPHABET[::-1],
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's template in short: ChatML turns, then the assistant header for generation.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Hidden 64, not smaller: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 inputs.
HIDDEN, LAYERS, HEADS = 64, 2, 2


def bert_tokenizer(vocab_size: int = 300) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer with BERT's special tokens and [CLS] x [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIALS, initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tok)


def chat_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and template, like SmolLM2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A BERT encoder without a head, like the packaged MiniLM (the head is added on load)."""
    tokenizer = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A Llama causal LM with grouped-query attention, like SmolLM2."""
    tokenizer = chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, intermediate_size=2 * HIDDEN,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
