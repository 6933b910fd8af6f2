"""The V0 model: adapter, loss, gradients through the frozen head, and a short fit."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from value_prior.backbone import HFBackbone
from value_prior.data import PairsDataModule
from value_prior.model import ResidualQueryAdapter, V0Module, pad_left, prompt_features, v0_loss


def test_pad_left() -> None:
    batch, mask = pad_left([torch.ones(2, 3), 2 * torch.ones(4, 3)])
    assert batch.shape == (2, 4, 3)
    assert mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert batch[0, :2].abs().sum() == 0 and batch[0, -1, 0] == 1  # last position holds the last token


def test_adapter_shapes_and_zero_init_generator() -> None:
    torch.manual_seed(0)
    adapter = ResidualQueryAdapter(hidden_size=12, num_queries=5, query_dim=4, num_heads=2).eval()
    assert adapter.num_features == 20
    hidden, mask = pad_left([torch.randn(3, 12), torch.randn(7, 12)])
    z = adapter(hidden, mask)
    assert z.shape == (2, 20)
    # W2 is zero-initialised: queries start at Q_static whatever the prompt's last token is.
    queries = adapter.generator_out(torch.randn(2, 128))
    assert torch.all(queries == 0)
    with pytest.raises(ValueError, match="divisible"):
        ResidualQueryAdapter(hidden_size=12, query_dim=5, num_heads=2)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_prompt_features_independent_of_batching(tiny_backbone: HFBackbone, pooling: str) -> None:
    torch.manual_seed(0)
    adapter = ResidualQueryAdapter(
        tiny_backbone.hidden_size, num_queries=3, query_dim=2, num_heads=1, pooling=pooling
    ).eval()
    torch.nn.init.normal_(adapter.generator_out.weight)  # a live query generator: padding must not leak in
    prompts = [
        "Q: 1+2*3=",
        "Find the number of positive integers n such that n^2 + 1 divides 2024.",
        "Q: 7+0*1=",
    ]
    with torch.no_grad():
        together = prompt_features(adapter, tiny_backbone, prompts, chunk_size=8)
        alone = torch.cat([prompt_features(adapter, tiny_backbone, [p]) for p in prompts])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_mean_pooling_reads_the_token_mean() -> None:
    torch.manual_seed(0)
    adapter = ResidualQueryAdapter(
        hidden_size=6, num_queries=2, query_dim=2, num_heads=1, pooling="mean"
    ).eval()
    torch.nn.init.normal_(adapter.generator_out.weight)
    tokens = torch.randn(3, 6)
    same_mean = tokens.mean(0, keepdim=True).expand(3, 6)  # other tokens, same mean -> same queries
    seen: list[torch.Tensor] = []
    adapter.generator_in.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    adapter(*pad_left([tokens, same_mean, torch.randn(5, 6)]))
    torch.testing.assert_close(seen[0][0], tokens.mean(0))
    torch.testing.assert_close(seen[0][0], seen[0][1])
    with pytest.raises(ValueError, match="pooling"):
        ResidualQueryAdapter(hidden_size=6, num_queries=2, query_dim=2, num_heads=1, pooling="max")


def test_v0_loss_hand_computed() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    y = torch.tensor([[1.0, 0.0, 0.6, 0.2]])  # labels 1, 0, 1, 0
    loss, pair, ce = v0_loss(s, y, pair_weight=0.25, ce_weight=0.75)
    margins = [2.0 - 0.0, 2.0 - 1.0, -1.0 - 0.0, -1.0 - 1.0]  # (pos, neg) pairs (0,1) (0,3) (2,1) (2,3)
    expected_pair = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 4
    expected_ce = float(F.binary_cross_entropy_with_logits(s, y))
    assert pair.item() == pytest.approx(expected_pair, rel=1e-6)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-6)
    # the pairwise term ranks by the episodes' own label threshold: at 0.3, 0.6 and 1.0 are successes
    inverted = torch.tensor([[-2.0, 2.0]])
    assert v0_loss(inverted, torch.tensor([[0.4, 0.2]]), threshold=0.3)[1].item() == pytest.approx(
        -math.log(1 / (1 + math.exp(4.0))), rel=1e-6
    )
    assert loss.item() == pytest.approx(0.25 * expected_pair + 0.75 * expected_ce, rel=1e-6)


def make_module(backbone: HFBackbone, head: str, **kw) -> V0Module:
    return V0Module(backbone=backbone, head=head, num_queries=4, query_dim=2, num_heads=1, **kw)


def test_gradient_reaches_adapter_through_frozen_head(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str
) -> None:
    module = make_module(tiny_backbone, shipped_head)
    dm = PairsDataModule(
        tiny_pairs_path, support_size=24, query_pairs=4, episodes_per_batch=2, batches_per_epoch=1
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    loss, _, _ = v0_loss(module.success_logits(batch), batch.query_success)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in module.head.parameters())
    grads = {name: p.grad for name, p in module.adapter.named_parameters()}
    assert grads["key_value.weight"].abs().sum() > 0
    assert grads["static_queries"].abs().sum() > 0
    assert grads["generator_out.weight"].abs().sum() > 0  # the residual query path learns too
    assert not module.head.training  # the frozen head stays in eval mode under module.train()


def test_fit_lowers_loss_and_leaves_backbone_and_head_unchanged(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str, tmp_path
) -> None:
    torch.manual_seed(0)
    module = make_module(tiny_backbone, shipped_head, lr=0.01, warmup_frac=0.0, dropout=0.0)
    dm = PairsDataModule(
        tiny_pairs_path, support_size=24, query_pairs=4, episodes_per_batch=4, batches_per_epoch=4
    )
    dm.setup("fit")
    fixed = list(dm.train_dataloader())  # the tiny episode set: 4 batches, replayed every epoch

    def mean_loss() -> float:
        module.eval()
        with torch.no_grad():
            return sum(v0_loss(module.success_logits(b), b.query_success)[0].item() for b in fixed) / len(
                fixed
            )

    before = mean_loss()
    head_state = copy.deepcopy(module.head.state_dict())
    tiny_backbone.hidden_states(["Q: 1+1="])  # load the encoder so its weights can be compared
    encoder_state = copy.deepcopy(tiny_backbone._encoder.state_dict())
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(
        module, train_dataloaders=torch.utils.data.DataLoader(fixed, batch_size=None, collate_fn=lambda b: b)
    )
    after = mean_loss()
    assert after < before - 0.01, (before, after)
    for name, value in module.head.state_dict().items():
        torch.testing.assert_close(value, head_state[name], rtol=0, atol=0)
    for name, value in tiny_backbone._encoder.state_dict().items():
        torch.testing.assert_close(value, encoder_state[name], rtol=0, atol=0)


def test_unfrozen_head_and_feature_noise(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str
) -> None:
    # freeze_head=False fine-tunes the head at head_lr (in train mode); feature_noise perturbs the features
    module = make_module(tiny_backbone, shipped_head, freeze_head=False, head_lr=1e-3, feature_noise=0.5)
    dm = PairsDataModule(
        tiny_pairs_path, support_size=24, query_pairs=4, episodes_per_batch=2, batches_per_epoch=1
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    assert module.head.training and all(p.requires_grad for p in module.head.parameters())
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value)  # no trainer attached
    torch.manual_seed(0)
    first = module.training_step(batch, 0)
    torch.manual_seed(1)
    assert module.training_step(batch, 0).item() != first.item()  # another noise draw, another loss
    first.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.head.parameters())
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # test double: the schedule reads it
    groups = module.configure_optimizers()["optimizer"].param_groups
    head_ids = {id(p) for p in module.head.parameters()}
    (head_group,) = [g for g in groups if {id(p) for p in g["params"]} == head_ids]
    assert head_group["lr"] == 1e-3


def test_more_than_one_process_is_refused_before_training(
    tiny_backbone: HFBackbone, shipped_head: str
) -> None:
    from types import SimpleNamespace

    module = V0Module(backbone=tiny_backbone, head=shipped_head)
    module._trainer = SimpleNamespace(world_size=2)  # test double: the check reads only world_size
    with pytest.raises(ValueError, match=r"runs on one device .* got 2 processes"):
        module.setup("fit")
    module._trainer = SimpleNamespace(world_size=1)
    module.setup("fit")


def test_bad_loss_weights(tiny_backbone: HFBackbone, shipped_head: str) -> None:
    with pytest.raises(ValueError, match="loss weights"):
        make_module(tiny_backbone, shipped_head, pair_weight=0.0, ce_weight=0.0)


def test_training_step_with_aux_and_shuffled_context_losses(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str
) -> None:
    module = make_module(tiny_backbone, shipped_head, aux_weight=1.0, shuffle_weight=1.0)
    dm = PairsDataModule(
        tiny_pairs_path, support_size=24, query_pairs=4, episodes_per_batch=2, batches_per_epoch=1
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    support_z, query_z = module.episode_features(batch)
    shuffled = module.shuffled_context_loss(batch, support_z, query_z)
    scores = module._head_scores(batch, support_z, query_z, batch.support_success[:, torch.randperm(24)])
    assert shuffled.item() > 0 and scores.shape == (2, 8)
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value)  # no trainer attached
    loss = module.training_step(batch, 0)
    loss.backward()
    assert {"train/loss_aux", "train/loss_shuffled_context", "train/loss"} <= set(logged)
    assert module.difficulty_probe.weight.grad.abs().sum() > 0
    assert loss.item() > logged["train/loss_pair"].item()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fit_and_validation_under_half_precision(
    tiny_backbone: HFBackbone, shipped_head: str, tiny_pairs_path: str, tmp_path, precision: str
) -> None:
    # `*-mixed`: the adapter returns bfloat16 features under autocast (validation once wrote them into a
    # float32 buffer); `*-true`: the adapter is bfloat16 while the backbone's states stay float32.
    module = make_module(tiny_backbone, shipped_head)
    dm = PairsDataModule(tiny_pairs_path, support_size=24, query_pairs=4, episodes_per_batch=2,
                         batches_per_epoch=1, val_fraction=0.3, test_fraction=0.2)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["val/gauc"]))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_prompt_features_of_no_prompts_is_an_empty_block() -> None:
    adapter = ResidualQueryAdapter(8, num_queries=2, query_dim=2, num_heads=1, bottleneck=4)
    assert prompt_features(adapter, None, []).shape == (0, 4)  # the backbone is never asked
