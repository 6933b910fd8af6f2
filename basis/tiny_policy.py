"""The offline tiny policy: a byte-level tokenizer and a small Qwen3 causal LM built on this machine.

Nothing can be downloaded here, so the project builds its own policy: `build_tokenizer` trains a
byte-level BPE tokenizer with `tokenizers` (one token per digit, a small vocabulary, EOS and PAD, and a
Jinja chat template that renders the arithmetic task's prompt format), `build_model` creates a randomly
initialised `Qwen3ForCausalLM` from a `Qwen3Config`, and `save_policy` writes both with
`save_pretrained`, so `AutoModelForCausalLM` / `AutoTokenizer` load the folder like any hub model.

Chat format (our choice, kept short because the RL trainer samples thousands of responses on CPU):
a user turn renders as `Q: {content}\n`, the generation prompt is `A:`, and an assistant turn is
` {content}<|endoftext|>`. So `Q: 45*2+23\nA:` is answered by ` 45*2=90 90+23=113 #### 113`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
USER_PREFIX = "Q: "
GENERATION_PROMPT = "A:"

# Jinja template: `Q: {user}\n` per user turn, `A: {assistant}<eos>\n` per assistant turn, and `A:` as
# the generation prompt. A system message is written as a plain first line.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}" + USER_PREFIX + "{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    + GENERATION_PROMPT
    + " {{ message['content'] + eos_token + '\\n' }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + GENERATION_PROMPT + "{%- endif -%}"
)

# Fallback training text for the tokenizer when no corpus is given (the untrained test fixture): the
# task's prompt/response format plus a little prose, so common merges exist. Any byte still encodes.
DEFAULT_CORPUS: tuple[str, ...] = (
    "Q: 8+73\nA: 81",
    "Q: 45*2+23\nA: 45*2=90 90+23=113 #### 113",
    "Q: (17-9)*(4+6)\nA: 17-9=8 4+6=10 8*10=80 #### 80",
    "Q: 96-3*12-40\nA: 3*12=36 96-36=60 60-40=20 #### 20",
    "Q: What is the value of $\\frac{1}{2} + \\frac{1}{3}$?\nA: The answer is $\\boxed{\\frac{5}{6}}$.",
    "The quick brown fox jumps over the lazy dog. Let x be a real number such that x^2 = 4.",
)


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 320, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with one token per digit.

    Args:
        corpus: Training texts; default `DEFAULT_CORPUS`. Every byte is in the base alphabet, so any
            text encodes whatever the corpus was.
        vocab_size: Target vocabulary size including the 256 byte tokens and 2 special tokens.
        min_frequency: Minimum pair count for a BPE merge.

    Returns:
        A `PreTrainedTokenizerFast` with EOS `<|endoftext|>`, PAD `<|pad|>`, left padding (decoder-only
        generation) and the chat template `CHAT_TEMPLATE`.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + 2:
        raise ValueError(
            f"vocab_size must be >= {len(byte_alphabet) + 2} (bytes + EOS + PAD), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    # Digits are split before byte-level splitting, so no merge can ever join two digits.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(DEFAULT_CORPUS if corpus is None else corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized for `tokenizer`, seeded.

    Args:
        tokenizer: Supplies the vocabulary size and the EOS/PAD ids.
        hidden_size: Model width; must be divisible by `num_heads`.
        num_layers: Transformer blocks.
        num_heads: Query heads (head_dim = hidden_size / num_heads).
        num_kv_heads: Key/value heads (grouped-query attention); must divide `num_heads`.
        intermediate_size: Width of the SwiGLU MLP.
        max_position_embeddings: Longest prompt + response in tokens.
        seed: Seed of the weight initialisation.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_policy(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write model, generation config, tokenizer and chat template to `path` with `save_pretrained`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tokenize_chat(tokenizer: PreTrainedTokenizerFast, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of each question rendered with the chat template and the generation prompt."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
