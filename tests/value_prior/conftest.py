"""Real tiny parts for the value_prior tests: a locally built BERT encoder + tokenizer (loaded through
the real `Auto*` classes), a small pairs dataset of arithmetic prompts, and the shipped head."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import pytest

from data_pipelines.pairs import PAIR_FEATURES
from value_prior.backbone import HFBackbone
from value_prior.model import DEFAULT_HEAD

CORPUS = [f"Q: {a}+{b}*{c}=" for a in range(0, 100, 7) for b in range(0, 60, 9) for c in range(1, 5)] + [
    "Find the number of positive integers n such that n^2 + 1 divides 2024.",
    "Let x be a real number with x + 1/x = 3. Compute x^3 + 1/x^3.",
]


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer, 32-wide BERT and a WordPiece tokenizer trained here, saved with `save_pretrained`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_encoder")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    fast.save_pretrained(path)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_backbone(tiny_encoder_dir: str, tmp_path: Path) -> HFBackbone:
    return HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path / "hidden_cache"))


@pytest.fixture(scope="session")
def shipped_head() -> str:
    """The committed prior-fitted head (value_prior/heads/capability_v2_small.ckpt)."""
    assert Path(DEFAULT_HEAD).is_file(), f"shipped head {DEFAULT_HEAD} is missing"
    return DEFAULT_HEAD


def arithmetic_pairs(
    num_prompts: int = 48, policies: tuple[str, ...] = ("alpha", "beta"), seed: int = 0
) -> list[dict]:
    """Pairs whose success falls with the size of the first operand, shifted per policy."""
    rng = random.Random(seed)
    rows = []
    for policy_index, policy in enumerate(policies):
        for step in (1, 2):
            for i in range(num_prompts):
                a, b, c = (i * 7) % 100, (i * 9) % 60, 1 + i % 4
                p = min(0.95, max(0.05, 1.0 - a / 100 + 0.1 * policy_index + 0.05 * step))
                successes = sum(rng.random() < p for _ in range(8))
                rows.append(
                    {
                        "policy": policy,
                        "step": step,
                        "prompt_id": f"arith_{i}",
                        "prompt": f"Q: {a}+{b}*{c}=",
                        "n": 8,
                        "successes": successes,
                        "score": 2 * successes / 8 - 1,
                    }
                )
    return rows


@pytest.fixture
def arithmetic_rows() -> list[dict]:
    return arithmetic_pairs()


@pytest.fixture
def tiny_pairs_path(tmp_path: Path) -> str:
    path = tmp_path / "pairs" / "pairs-00000.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(arithmetic_pairs(), features=PAIR_FEATURES).to_parquet(str(path))
    return str(path.parent)
