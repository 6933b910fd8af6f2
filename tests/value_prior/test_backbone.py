"""The frozen backbone and its hidden-state cache (memory and disk, keyed by text hash)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertModel

from value_prior.backbone import (
    DEFAULT_BACKBONE,
    CacheWriteWarning,
    CorruptCacheWarning,
    HFBackbone,
    TextBackbone,
    resolve_backbone_path,
    text_key,
)


def test_hidden_states_per_prompt(tiny_backbone: HFBackbone) -> None:
    assert isinstance(tiny_backbone, TextBackbone)
    prompts = [
        "Q: 23+45*2=",
        "Q: 1+1=",
        "Find the number of positive integers n such that n^2 + 1 divides 2024.",
    ]
    states = tiny_backbone.hidden_states(prompts)
    assert [s.shape[1] for s in states] == [32, 32, 32]
    assert states[0].shape[0] > states[1].shape[0]  # unpadded: one row per token
    assert states[2].shape[0] <= 32  # truncated to max_length
    assert all(s.dtype == torch.float32 for s in states)


def test_a_prompt_cut_at_max_length_is_said_once(
    tiny_encoder_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Prompts past max_length were cut silently: two that differ only after it got one prediction."""
    backbone = HFBackbone(tiny_encoder_dir, max_length=8, cache_dir=None)
    with caplog.at_level("WARNING", logger="value_prior.backbone"):
        backbone.hidden_states(["Q: 1+1="])
        assert "max_length" not in caplog.text
        backbone.hidden_states(["Q: 12+34*56-78+90*12=", "Q: 1+2="])
        backbone.hidden_states(["Q: 98+76*54-32+10*98="])
    (record,) = [r for r in caplog.records if "max_length=8" in r.getMessage()]
    assert "cut to their first 8" in record.getMessage()


def test_batching_does_not_change_states(tiny_backbone: HFBackbone, tiny_encoder_dir: str) -> None:
    prompts = ["Q: 23+45*2=", "Q: 1+1=", "Q: 7+7*7="]
    together = tiny_backbone.hidden_states(prompts)
    alone = HFBackbone(tiny_encoder_dir, max_length=32, batch_size=1, cache_dir=None).hidden_states(prompts)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # float16 storage


def test_disk_cache_is_reused_without_loading_the_encoder(tiny_encoder_dir: str, tmp_path: Path) -> None:
    first = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
    states = first.hidden_states(["Q: 2+2*2=", "Q: 2+2*2="])
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1  # one file per distinct text
    assert files[0].stem == text_key(first.backbone_id, 32, "Q: 2+2*2=")
    second = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
    again = second.hidden_states(["Q: 2+2*2="])
    assert second._encoder is None  # served from disk
    torch.testing.assert_close(again[0], states[0], rtol=0, atol=0)


def _header_size(data: bytes) -> int:
    """Bytes before the tensor data of a safetensors file (8-byte length + JSON header)."""
    return 8 + int.from_bytes(data[:8], "little")


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "zeroed data": lambda data: data[: _header_size(data)] + bytes(len(data) - _header_size(data)),
    "NaN data": lambda data: (
        data[: _header_size(data)] + b"\x00\x7e" * ((len(data) - _header_size(data)) // 2)
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_corrupt_cache_file_is_reported_deleted_and_re_embedded(
    corruption: str, tiny_encoder_dir: str, tmp_path: Path
) -> None:
    prompts = ["Q: 23+45*2=", "Q: 1+1="]
    states = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path)).hidden_states(prompts)
    second = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
    path = second._disk_path(text_key(second.backbone_id, 32, prompts[0]))
    assert path is not None
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    with pytest.warns(CorruptCacheWarning, match=f"{re.escape(str(path))} .*deleting it and re-embedding"):
        again = second.hidden_states(prompts)
    for a, b in zip(again, states):  # the same states as before the damage, not NaN or zeros
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with warnings.catch_warnings():  # the re-embedded file replaced the bad one and passes its check
        warnings.simplefilter("error", CorruptCacheWarning)
        third = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
        torch.testing.assert_close(third.hidden_states(prompts)[0], states[0], rtol=0, atol=0)
    assert third._encoder is None


def test_cache_file_of_the_wrong_shape_or_dtype_is_re_embedded(tiny_encoder_dir: str, tmp_path: Path) -> None:
    backbone = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
    path = backbone._disk_path(text_key(backbone.backbone_id, 32, "Q: 1+1="))
    assert path is not None
    path.parent.mkdir(parents=True)
    for wrong, problem in [
        (torch.zeros(5, 33, dtype=torch.float16), r"of shape \[5, 33\], expected \[1..32, 32\]"),
        (torch.zeros(33, 32, dtype=torch.float16), r"of shape \[33, 32\]"),
        (torch.zeros(5, 32), "of dtype torch.float32"),
    ]:
        save_file({"hidden": wrong}, str(path))
        with pytest.warns(CorruptCacheWarning, match=problem):
            state = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path)).hidden_states(
                ["Q: 1+1="]
            )[0]
        assert state.shape[1] == 32 and state.abs().sum() > 0


def test_cache_files_without_a_checksum_are_still_served(
    tiny_encoder_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caches written before the checksum existed are kept (checked on dtype, shape and finiteness)."""
    synced: list[int] = []
    monkeypatch.setattr("value_prior.backbone.os.fsync", synced.append)
    first = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
    states = first.hidden_states(["Q: 2+2*2="])
    assert len(synced) == 1  # each new file is fsynced before its rename
    path = first._disk_path(text_key(first.backbone_id, 32, "Q: 2+2*2="))
    assert path is not None
    save_file({"hidden": states[0].half()}, str(path))  # the old layout: no metadata
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCacheWarning)
        second = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
        torch.testing.assert_close(second.hidden_states(["Q: 2+2*2="])[0], states[0], rtol=0, atol=0)
    assert second._encoder is None and path.is_file()


def test_unwritable_cache_keeps_new_states_in_memory(
    tiny_encoder_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache folder that cannot be written (full disk, read-only mount) costs the disk copy, never the
    call: one warning, the states are served from memory, no temporary file is left behind."""
    cached = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=str(tmp_path))
    cached.hidden_states(["Q: 1+1="])  # an existing, readable cache entry

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("value_prior.backbone.os.fsync", disk_full)
    backbone = HFBackbone(tiny_encoder_dir, max_length=32, batch_size=1, cache_dir=str(tmp_path))
    prompts = ["Q: 1+1=", "Q: 23+45*2=", "Q: 7+7*7="]
    with pytest.warns(CacheWriteWarning, match="cannot be written .*No space left") as record:
        states = backbone.hidden_states(prompts)
    assert len([w for w in record if w.category is CacheWriteWarning]) == 1
    fresh = HFBackbone(tiny_encoder_dir, max_length=32, cache_dir=None).hidden_states(prompts)
    for a, b in zip(states, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(p.suffix for p in tmp_path.rglob("*") if p.is_file()) == [".safetensors"]


def test_cache_key_depends_on_text_length_and_backbone() -> None:
    base = text_key("m", 256, "Q: 1+1=")
    assert base == text_key("m", 256, "Q: 1+1=")
    assert (
        len(
            {
                base,
                text_key("m", 128, "Q: 1+1="),
                text_key("n", 256, "Q: 1+1="),
                text_key("m", 256, "Q: 1+2="),
            }
        )
        == 4
    )


def test_max_length_beyond_the_models_positions_is_refused_at_load(tiny_encoder_dir: str) -> None:
    # it crashed at the first prompt longer than the model's positions, naming neither setting nor model
    backbone = HFBackbone(tiny_encoder_dir, max_length=128, cache_dir=None)  # the tiny BERT: 64 positions
    with pytest.raises(ValueError, match="cannot embed max_length=128 tokens"):
        backbone.hidden_states(["a short prompt"])


@pytest.mark.parametrize(
    ("kind", "max_length", "fits"), [("roberta", 66, False), ("roberta", 65, True), ("deberta", 128, True)]
)
def test_max_length_is_probed_not_read_from_the_config(
    tiny_encoder_dir: str,
    tmp_path: Path,
    kind: str,
    max_length: int,
    fits: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RoBERTa's 66 positions hold 65 tokens (offset by its padding index 0); DeBERTa-v2's relative
    # attention runs past its max_position_embeddings=64. The config alone gets both wrong.
    from transformers import DebertaV2Config, DebertaV2Model, RobertaConfig, RobertaModel

    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(tmp_path)
    small = dict(
        vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    if kind == "roberta":
        RobertaModel(RobertaConfig(**small, max_position_embeddings=66, pad_token_id=0)).save_pretrained(
            tmp_path
        )
    else:
        config = DebertaV2Config(
            **small, max_position_embeddings=64, position_biased_input=False, relative_attention=True,
            pos_att_type=["p2c", "c2p"], position_buckets=16,
        )  # fmt: skip
        DebertaV2Model(config).save_pretrained(tmp_path)
    backbone = HFBackbone(str(tmp_path), max_length=max_length, cache_dir=None)
    if fits:
        assert backbone.hidden_states(["a short prompt"])[0].shape[-1] == 32
    else:
        with pytest.raises(ValueError, match=f"cannot embed max_length={max_length} tokens"):
            backbone.hidden_states(["a short prompt"])
        monkeypatch.setattr("transformers.AutoModel.from_pretrained", None)  # not loaded a second time
        with pytest.raises(ValueError, match=f"cannot embed max_length={max_length} tokens"):
            backbone.hidden_states(["another prompt"])


def test_a_decoder_whose_tokenizer_has_no_pad_token(tmp_path: Path) -> None:
    # GPT-2 / Llama 3 style: no pad token, so every batch raised "Asking to pad but the tokenizer ..."
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(["Q: 1+2*3= what is x", "Let x + 1/x = 3"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path
    )
    size = dict(n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2Model(
        GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=1, **size)
    ).save_pretrained(tmp_path)
    short, long = "Q: 1+2*3=", "Let x + 1/x = 3 what is x"
    together = HFBackbone(str(tmp_path), max_length=32, cache_dir=None).hidden_states([short, long])
    alone = HFBackbone(str(tmp_path), max_length=32, cache_dir=None).hidden_states([short])
    torch.testing.assert_close(together[0], alone[0])  # right padding: pads never reach a real token


def test_bad_inputs(tiny_backbone: HFBackbone, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt 1 is ''"):
        tiny_backbone.hidden_states(["Q: 1+1=", ""])
    with pytest.raises(ValueError, match=r"prompt 1 'Q: \\ud83d' is not valid Unicode"):
        tiny_backbone.hidden_states(["Q: 1+1=", "Q: \ud83d"])  # a lone surrogate: an emoji cut in half
    with pytest.raises(ValueError, match="does not exist"):
        HFBackbone(str(tmp_path / "no-model"))
    with pytest.raises(ValueError, match="max_length"):
        HFBackbone(max_length=1)


def test_default_backbone_is_the_packaged_minilm() -> None:
    path = Path(resolve_backbone_path(DEFAULT_BACKBONE))
    assert (path / "config.json").is_file()
    backbone = HFBackbone(cache_dir=None)
    assert backbone.hidden_size == 384
    # Stable across instances, and not the bare name that older caches were keyed by (they are missed).
    assert backbone.backbone_id == HFBackbone(cache_dir=None).backbone_id
    assert backbone.backbone_id.startswith(f"{DEFAULT_BACKBONE}-")


def test_models_in_same_named_folders_do_not_share_cached_states(
    tiny_encoder_dir: str, tmp_path: Path
) -> None:
    run_a, run_b = tmp_path / "runA" / "final", tmp_path / "runB" / "final"
    shutil.copytree(tiny_encoder_dir, run_a)
    shutil.copytree(tiny_encoder_dir, run_b)
    torch.manual_seed(1)
    BertModel(BertModel.from_pretrained(run_b).config).save_pretrained(run_b)  # same shape, other weights
    cache = str(tmp_path / "cache")
    first = HFBackbone(str(run_a), max_length=32, cache_dir=cache)
    second = HFBackbone(str(run_b), max_length=32, cache_dir=cache)
    prompt = ["Q: 23+45*2="]
    states_a = first.hidden_states(prompt)[0]
    states_b = second.hidden_states(prompt)[0]  # must not be served from the first model's cache
    fresh_b = HFBackbone(str(run_b), max_length=32, cache_dir=None).hidden_states(prompt)[0]
    torch.testing.assert_close(states_b, fresh_b, rtol=0, atol=0)
    assert not torch.allclose(states_a, states_b, atol=1e-2)
    assert first.backbone_id != second.backbone_id and first.cache_dir != second.cache_dir
    BertModel(BertModel.from_pretrained(run_b).config).save_pretrained(run_a)  # weights rewritten in place
    assert HFBackbone(str(run_a), max_length=32, cache_dir=cache).backbone_id != first.backbone_id


def test_left_padding_tokenizer_keeps_each_prompts_own_tokens(tmp_path: Path) -> None:
    """A tokenizer configured with `padding_side: left` (as Qwen3-Embedding's may be) must not change the
    states: a short prompt embedded beside a long one equals the prompt embedded alone."""
    source = Path(resolve_backbone_path(DEFAULT_BACKBONE))
    model = tmp_path / "minilm-left-padding"
    model.mkdir()
    for file in source.iterdir():
        if file.is_file() and file.name != "tokenizer_config.json":
            (model / file.name).symlink_to(file)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"padding_side": "left"}))
    assert AutoTokenizer.from_pretrained(model).padding_side == "left"
    short = "Q: 23+45*2="
    long = "Find the number of positive integers n such that n^2 + 1 divides 2024, and explain why."
    together = HFBackbone(str(model), batch_size=2, cache_dir=None).hidden_states([short, long])
    alone = HFBackbone(str(model), batch_size=1, cache_dir=None).hidden_states([short])
    assert together[0].shape == alone[0].shape
    # Both are float16-stored: equal up to one float16 rounding step of a float32 difference ~1e-6.
    torch.testing.assert_close(together[0], alone[0], rtol=2e-3, atol=1e-4)
