"""Tokenizer: offline byte-level BPE training, the chat template and special-token checks.

The tokenizer is a plain `transformers` fast tokenizer saved with `save_pretrained`, so
`AutoTokenizer.from_pretrained(dir)` reloads it offline with identical ids and chat template.
Special tokens come first in the vocab (PAD = 0), the template adds no BOS and the tokenizer adds
no BOS/EOS either: every token of a sample comes from the chat template, which the processor and
the label masking rely on.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE_TOKEN, *ROLE_TOKENS]
# Tokens beyond pad/bos/eos/unk that the model needs; registered as extra special tokens so they
# are never split by BPE and are dropped by `decode(..., skip_special_tokens=True)`.
EXTRA_SPECIAL_TOKENS = [IMAGE_TOKEN, *ROLE_TOKENS]

# Each message: "<|role|>\n" + content + "<|end|>\n". Typed content items render in order:
# {"type": "image"} -> "<image>\n", {"type": "text", "text": ...} -> the text.
# The assistant's content and its "<|end|>" sit inside {% generation %}, so
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens to train on
# (the model must learn to emit <|end|> to stop). The "\n" after <|end|> is not a target.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' }}"
    "{%- if message['content'] is string -%}"
    "{%- set ns = namespace(text=message['content']) -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text ~ '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text ~ item['text'] -%}"
    "{%- else -%}{{ raise_exception('unknown content type ' ~ item['type'] ~ '; expected image or text') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ ns.text ~ '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ ns.text ~ '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def _bpe_tokenizer() -> Tokenizer:
    """Untrained byte-level BPE: bytes are the alphabet, so nothing is ever unknown."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False: "top left" after "<|assistant|>\n" tokenizes exactly like
    # "top left" on its own, so answers round-trip through encode/decode unchanged.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No automatic BOS/EOS: the chat template owns every token. (transformers v5 swaps this for
    # an identity TemplateProcessing driven by add_bos_token/add_eos_token, both False below.)
    tokenizer.post_processor = None
    return tokenizer


def train_tokenizer(
    corpus_files: list[str], out_dir: str | os.PathLike, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on text files, save it under `out_dir`, return the HF tokenizer."""
    missing = [f for f in corpus_files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"tokenizer corpus file not found: {missing[0]!r}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
            f"{len(alphabet)} byte tokens alone need {len(SPECIAL_TOKENS) + len(alphabet)}"
        )
    tokenizer = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..8 in this order, so PAD is 0
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train([os.fspath(f) for f in corpus_files], trainer)
    hf_tokenizer = wrap_tokenizer(tokenizer)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(out_dir)
    return hf_tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` object as a transformers tokenizer with our special tokens and template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        add_eos_token=False,
        # Keep decode byte-exact ("a , b" must not become "a, b").
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by `train_tokenizer` or any hub tokenizer."""
    return AutoTokenizer.from_pretrained(os.fspath(name_or_path))


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make a foreign tokenizer usable here: add the image and role tokens as special tokens
    when missing and set our chat template when it has none.

    Returns the number of tokens added to the vocab; the caller must then resize the model's
    embeddings (`model.resize_token_embeddings(len(tokenizer))`).
    """
    special = set(tokenizer.all_special_tokens)
    missing = [token for token in EXTRA_SPECIAL_TOKENS if token not in special]
    added = 0
    if missing:
        added = tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return added
