"""Flexora-specific invariants (METHODS.md §13); the shared S1-S6 run in test_invariants.py."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lightning_lora as ll
from lightning_lora.methods.flexora import (
    Flexora,
    FlexoraConfig,
    FlexoraLinear,
    gate_values,
    group_layers,
    layer_key,
    read_flexora_metadata,
    select_layers,
)
from lightning_lora.tasks import SequenceClassifier
from tests.conftest import build_tiny_bert, build_tiny_gpt2

TARGETS = ["query", "value", "intermediate.dense"]


# ---- data and models -----------------------------------------------------------------------------
def _examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n, 7), generator=g)
    labels = (ids[:, 0] > 48).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(7, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


class TinyGlue(pl.LightningDataModule):
    def __init__(self, n_train: int = 64, n_val: int = 24) -> None:
        super().__init__()
        self.train_set, self.val_set = _examples(n_train, 0), _examples(n_val, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=8)


def bert_cls(seed: int = 0) -> nn.Module:
    return build_tiny_bert(seed, classifier=True).train()


def trainer(max_steps: int, callbacks: list[pl.Callback], **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, accelerator="cpu", **kw)


def flexora_callback(**kw) -> ll.AdapterCallback:
    options = dict(r=4, alpha=8, search_steps=3, gate_batches=2, granularity="module", target_modules=TARGETS,
                   modules_to_save=["classifier"])
    options.update(kw)
    return ll.AdapterCallback("flexora", target="model", **options)


def fit_flexora(max_steps: int = 7, seed: int = 0, precision: str = "32-true",
                **kw) -> tuple[SequenceClassifier, ll.AdapterCallback, pl.Trainer]:
    pl.seed_everything(seed, verbose=False)
    module = SequenceClassifier(bert_cls(seed), lr=1e-2, warmup_ratio=0.0)
    cb = flexora_callback(**kw)
    t = trainer(max_steps, [cb], precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, datamodule=TinyGlue())
    return module, cb, t


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train(was)
    return out


def val_batch(n: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(_examples(n, seed), batch_size=n)))


# ---- gates ---------------------------------------------------------------------------------------
def test_gates_are_one_at_zero_logits_for_any_layer_count():
    for L in range(1, 130):
        assert torch.equal(gate_values(torch.zeros(L)), torch.ones(L)), L


def test_gates_sum_to_L_and_raising_one_logit_raises_its_gate_only():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, generator=g)
    w = gate_values(a)
    torch.testing.assert_close(w.sum(), torch.tensor(6.0))
    b = a.clone()
    b[2] += 0.5
    w2 = gate_values(b)
    assert w2[2] > w[2]
    assert all(w2[i] < w[i] for i in range(6) if i != 2)


@pytest.mark.parametrize("power", [1, 3])
def test_gated_forward_is_plain_lora_at_zero_logits_and_w_power_p_otherwise(power):
    lora = build_tiny_bert(0)
    ll.inject_adapter(lora, "lora", r=4, alpha=8, target_modules=TARGETS)
    flex = build_tiny_bert(0)
    layers = ll.inject_adapter(flex, "flexora", r=4, alpha=8, target_modules=TARGETS, gate_power=power)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # same non-zero LoRA factors in both
        for name, layer in ll.adapter_layers(lora).items():
            layer.lora_B.normal_(generator=g)
            layers[name].lora_A.copy_(layer.lora_A)
            layers[name].lora_B.copy_(layer.lora_B)
    x = {"input_ids": torch.randint(0, 96, (2, 7), generator=g)}
    with torch.no_grad():
        y_lora = lora(**x).last_hidden_state
        assert torch.equal(flex(**x).last_hidden_state, y_lora)  # invariant 1: α̂ = 0 is plain LoRA
        method = ll.get_adapter_method(flex)
        assert method.layer_keys == ["encoder.layer.0", "encoder.layer.1"]
        method.set_gate_logits(torch.tensor([0.7, -0.7]), layers)
        w = gate_values(torch.tensor([0.7, -0.7]))
        for name, layer in ll.adapter_layers(lora).items():  # the reference: B scaled by w_l^p
            layer.lora_B.mul_(w[int(name.split(".")[2])] ** power)
        torch.testing.assert_close(flex(**x).last_hidden_state, lora(**x).last_hidden_state, atol=1e-5, rtol=0)


def test_layer_grouping_by_block_or_module():
    cfg = FlexoraConfig()
    assert layer_key("encoder.layer.11.attention.self.query", cfg) == "encoder.layer.11"
    assert layer_key("model.layers.3.self_attn.q_proj", cfg) == "model.layers.3"
    assert layer_key("transformer.h.0.attn.c_attn", cfg) == "transformer.h.0"
    assert layer_key("fc1", cfg) == "fc1"  # outside any numbered block: its own layer
    per_module = FlexoraConfig(granularity="module")
    assert layer_key("encoder.layer.1.output.dense", per_module) == "encoder.layer.1.output.dense"
    custom = FlexoraConfig(block_pattern=r"stage\d+")
    assert layer_key("net.stage2.conv.fc", custom) == "net.stage2"
    groups = group_layers(["a.layer.0.q", "a.layer.0.v", "a.layer.1.q", "head"], cfg)
    assert groups == {"a.layer.0": ["a.layer.0.q", "a.layer.0.v"], "a.layer.1": ["a.layer.1.q"], "head": ["head"]}
    gpt2 = build_tiny_gpt2(0)
    ll.inject_adapter(gpt2, "flexora", target_modules=["c_attn", "mlp.c_proj"])
    assert ll.get_adapter_method(gpt2).layer_keys == ["transformer.h.0", "transformer.h.1"]


def test_selection_rule():
    keys = ["l0", "l1", "l2", "l3"]
    cfg = FlexoraConfig()
    assert select_layers([0.3, -0.1, 0.0, 1e-7], keys, cfg) == ["l0", "l3"]  # exactly α̂ > 0
    assert select_layers([0.0] * 4, keys, cfg) == keys  # empty set -> documented fallback: all
    assert select_layers([-0.2, -0.1, -0.3, -0.4], keys, cfg) == keys
    with pytest.raises(RuntimeError, match="no layer"):
        select_layers([0.0] * 4, keys, FlexoraConfig(empty_selection="error"))
    top2 = FlexoraConfig(selection="top_k", top_k=2)
    assert select_layers([0.1, 0.5, 0.5, -1.0], keys, top2) == ["l1", "l2"]
    assert select_layers([0.0] * 4, keys, top2) == ["l0", "l1"]  # ties: the earlier layers


@pytest.mark.parametrize("bad", [dict(use_dora=True), dict(search_steps=0), dict(gate_batches=0), dict(gate_lr=0.0),
                                 dict(granularity="head"), dict(selection="top_k"), dict(exclusion="drop"),
                                 dict(block_pattern="("), dict(retrain_schedule="restart")])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        FlexoraConfig(**bad)


# ---- the gate step: gate gradient from validation batches only; θ untouched -------------------
def _ce(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])


def _summed_loss_at(model: nn.Module, logits: torch.Tensor, batches: list[dict[str, torch.Tensor]]) -> float:
    """Σ_k L(batch_k) with the gates set to ``logits`` (a constant), eval mode, in fp64."""
    m = copy.deepcopy(model).double()
    method = ll.get_adapter_method(m)
    method.set_gate_logits(logits, ll.adapter_layers(m))
    m.eval()
    with torch.no_grad():
        return sum(float(_ce(m, b).double()) for b in batches)


def test_gate_step_follows_the_validation_loss_and_leaves_lora_untouched():
    model = bert_cls(0)
    layers = ll.inject_adapter(model, "flexora", r=4, alpha=8, target_modules=TARGETS, granularity="module",
                               gate_batches=2, dropout=0.25)
    method: Flexora = ll.get_adapter_method(model)  # type: ignore[assignment]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(generator=g)
    val = [val_batch(8, seed=11), val_batch(8, seed=12)]
    train = [val_batch(8, seed=21), val_batch(8, seed=22)]
    method.set_gate_data(val)
    method.set_gate_loss(lambda module, batch: _ce(module, batch))
    sentinel = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = sentinel[n].clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    fake_trainer = SimpleNamespace()  # no strategy / precision plugin: plain CPU tensors
    method.gate_step(fake_trainer, model, layers)

    assert model.training, "training mode must be restored after the gate step"
    for n, p in model.named_parameters():  # θ (and the head) unchanged, their .grad untouched
        assert torch.equal(p, before[n]), n
        if p.requires_grad:
            assert torch.equal(p.grad, sentinel[n]), n
    alpha = method.gate_logits
    assert alpha is not None and alpha.grad is None and method.gate_steps == 1
    assert not torch.equal(alpha.detach(), torch.zeros_like(alpha))
    # the gradient Adam used (first step: exp_avg = (1 - β1)·g) is ∇_α̂ of the summed VALIDATION loss
    grad = method.gate_optimizer.state[alpha]["exp_avg"] / 0.1
    def central_difference(batches: list[dict[str, torch.Tensor]], h: float = 1e-3) -> torch.Tensor:
        zero = torch.zeros_like(alpha.detach())
        return torch.tensor([(_summed_loss_at(model, zero + h * e, batches) - _summed_loss_at(model, zero - h * e, batches))
                             / (2 * h) for e in torch.eye(alpha.numel())])

    fd_val, fd_train = central_difference(val), central_difference(train)
    tol = 1e-3 * fd_val.abs().max().item()
    torch.testing.assert_close(grad.double(), fd_val.double(), atol=tol, rtol=0)
    assert (fd_train - fd_val).abs().max() > 100 * tol, "training batches give the same gradient: test is vacuous"
    # Adam's first step (lr 0.01, eps 1e-8): α̂ = -lr·g / (|g| + eps); the gates follow α̂
    torch.testing.assert_close(alpha.detach(), -0.01 * grad / (grad.abs() + 1e-8), atol=1e-7, rtol=0)
    w = gate_values(alpha.detach())
    for name, layer in layers.items():
        assert layer.gate == pytest.approx(float(w[method.layer_keys.index(name)]))


def test_gate_batches_are_split_and_the_source_restarts():
    model = bert_cls(0)
    layers = ll.inject_adapter(model, "flexora", r=4, target_modules=TARGETS, gate_batches=5, gate_batch_size=3)
    method: Flexora = ll.get_adapter_method(model)  # type: ignore[assignment]
    seen: list[int] = []

    def loss_fn(module, batch):
        seen.append(int(batch["labels"].numel()))
        return _ce(module, batch)

    first, second = val_batch(8, seed=1), val_batch(4, seed=2)
    method.set_gate_data([first, second])  # micro-batches 3, 3, 2 | 3, 1 | then the source restarts
    method.set_gate_loss(loss_fn)
    method.gate_step(SimpleNamespace(), model, layers)
    assert seen == [3, 3, 2, 3, 1]
    method.gate_step(SimpleNamespace(), model, layers)
    assert seen[5:] == [3, 3, 2, 3, 1]


def test_no_validation_data_is_a_clear_error():
    model = bert_cls(0)
    layers = ll.inject_adapter(model, "flexora", target_modules=TARGETS)
    with pytest.raises(RuntimeError, match="validation batches"):
        ll.get_adapter_method(model).gate_step(SimpleNamespace(datamodule=None), model, layers)


# ---- inside a Trainer: train step vs gate step ----------------------------------------------------
class SGDClassifier(SequenceClassifier):
    """Plain SGD, no schedule: an optimizer step is exactly θ - lr·∇θ L_train."""

    def configure_optimizers(self):
        return torch.optim.SGD(ll.trainable_parameters(self), lr=self.lr)


class StepProbe(pl.Callback):
    """Before the AdapterCallback: at batch start, the reference gradient of the TRAINING loss at the
    current θ (a copy of the model); before the optimizer step, the gradient the module got."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ref = copy.deepcopy(pl_module.model)
        names = [n for n, p in ref.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(_ce(ref, batch), [p for n, p in ref.named_parameters() if p.requires_grad])
        params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.records.append({"ref_grad": dict(zip(names, grads)), "params": params})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        method = ll.get_adapter_method(pl_module.model)
        alpha = method.gate_logits
        self.records[-1]["alpha_grad"] = None if alpha is None else alpha.grad
        self.records[-1]["grad"] = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()
                                    if p.requires_grad and p.grad is not None}
        self.records[-1]["opt_ids"] = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.records[-1]["alpha_id"] = id(alpha)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # runs before the AdapterCallback's hook (callback order): θ after the optimizer step only
        self.records[-1]["after_opt"] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                         if p.requires_grad}


class AfterGate(pl.Callback):
    """After the AdapterCallback: θ after the gate step."""

    def __init__(self, probe: StepProbe) -> None:
        self.probe = probe

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.probe.records[-1]["after_gate"] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                                if p.requires_grad}


def test_train_steps_use_training_batches_only_and_gate_steps_leave_lora_alone():
    pl.seed_everything(0, verbose=False)
    lr = 0.05
    module = SGDClassifier(bert_cls(0), lr=lr)
    probe = StepProbe()
    cb = flexora_callback(search_steps=3, gate_batches=2)
    t = trainer(2, [probe, cb, AfterGate(probe)])
    t.fit(module, datamodule=TinyGlue())
    assert len(probe.records) == 2 and cb.method.gate_steps == 2
    for rec in probe.records:
        assert rec["alpha_grad"] is None  # the train step never builds a graph through α̂
        assert rec["alpha_id"] not in rec["opt_ids"]  # the module's optimizer does not hold the gates
        assert set(rec["grad"]) == set(rec["ref_grad"])
        for n, g in rec["grad"].items():  # adapter gradients = ∇ L_train(training batch) at θ_t
            torch.testing.assert_close(g, rec["ref_grad"][n], atol=1e-6, rtol=1e-5, msg=n)
            torch.testing.assert_close(rec["after_opt"][n], rec["params"][n] - lr * g, atol=1e-7, rtol=0)
            assert torch.equal(rec["after_gate"][n], rec["after_opt"][n]), f"gate step moved {n}"
    assert [id(p) for p in cb.method.gate_optimizer.param_groups[0]["params"]] == [id(cb.method.gate_logits)]


def test_gate_steps_once_per_optimizer_step_under_accumulation():
    pl.seed_everything(0, verbose=False)
    module = SequenceClassifier(bert_cls(0), lr=1e-2)
    cb = flexora_callback(search_steps=10)
    t = trainer(3, [cb], accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="ends before any layer is selected"):
        t.fit(module, datamodule=TinyGlue())
    assert t.global_step == 3 and cb.method.gate_steps == 3 and cb.method.phase == "search"


# ---- the switch: selection, removal, re-init, optimizer rebuild -------------------------------------
class SwitchProbe(pl.Callback):
    """Adapter state at every batch start, and what the optimizer holds."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append({
            "step": trainer.global_step,
            "layers": {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone())
                       for n, l in ll.adapter_layers(pl_module.model).items()},
            "opt_ids": {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        })


def test_fit_selects_by_the_rule_and_retrains_only_the_selected_layers():
    base = bert_cls(0)
    pl.seed_everything(0, verbose=False)
    module = SequenceClassifier(bert_cls(0), lr=1e-2, warmup_ratio=0.0)
    probe = SwitchProbe()
    cb = flexora_callback(search_steps=3)
    t = trainer(7, [probe, cb])
    t.fit(module, datamodule=TinyGlue())
    method: Flexora = cb.method  # type: ignore[assignment]
    summary = method.summary()
    assert summary["phase"] == "retrain" and summary["gate_steps"] == 3
    all_modules = list(probe.states[0]["layers"])
    assert summary["layers"] == all_modules  # granularity="module": one gate per adapted module
    expected = [k for k, a in zip(summary["layers"], summary["gate_logits"]) if a > 0]
    assert summary["selected"] == expected and 0 < len(expected) < len(all_modules), "rule or vacuous test"
    selected = set(expected)
    # unselected modules are plain Linear layers again, with the untouched base weights
    remaining = ll.adapter_layers(module.model)
    assert set(remaining) == selected and set(cb.layers) == selected
    for name in all_modules:
        if name not in selected:
            m = module.model.get_submodule(name)
            assert type(m) is nn.Linear
            assert torch.equal(m.weight, base.get_submodule(name).weight)
    # trainable count: |S| LoRA modules + the head; the rebuilt optimizer holds exactly those
    per_module = {n: 4 * (l.in_features + l.out_features) for n, l in remaining.items()}
    head = sum(p.numel() for p in module.model.classifier.parameters())
    assert sum(p.numel() for p in ll.trainable_parameters(module)) == sum(per_module.values()) + head
    assert {id(p) for g in t.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in ll.trainable_parameters(module)}
    # the first retraining batch starts from a fresh LoRA (B = 0, new A) in the selected layers
    first_retrain = next(s for s in probe.states if s["step"] == 3)
    last_search = next(s for s in probe.states if s["step"] == 2)
    for name in selected:
        A, B = first_retrain["layers"][name]
        assert torch.equal(B, torch.zeros_like(B))
        assert not torch.equal(A, last_search["layers"][name][0])
    assert set(first_retrain["layers"]) == selected
    assert all(layer.gate == 1.0 for layer in remaining.values())
    # fresh schedule over the 4 retraining steps (no warmup): lr 1e-2 at the switch, 0 at the end
    assert first_retrain["lr"] == pytest.approx(1e-2)
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_zero_exclusion_keeps_unselected_branches_inert(tmp_path):
    module, cb, t = fit_flexora(max_steps=7, exclusion="zero")
    method: Flexora = cb.method  # type: ignore[assignment]
    layers = ll.adapter_layers(module.model)
    assert set(layers) == set(method.layer_keys)  # nothing removed
    assert set(method.excluded_modules) == set(method.layer_keys) - set(method.selected)
    for name in method.excluded_modules:
        layer = layers[name]
        assert torch.equal(layer.delta_weight(), torch.zeros_like(layer.delta_weight()))
        assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in method.selected_modules for f in "AB"} | {
        "classifier.weight", "classifier.bias"}
    cb.save_adapter(module, tmp_path / "zero")  # loads with the same inert, frozen branches
    fresh = bert_cls(0)
    ll.load_adapter(fresh, tmp_path / "zero")
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable
    batch = val_batch(8, seed=5)
    assert torch.equal(logits_of(fresh, batch), logits_of(module.model, batch))


def test_continue_schedule_keeps_the_step_count():
    _, _, t = fit_flexora(max_steps=6, retrain_schedule="continue")
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 6


# ---- save / load of the selection ------------------------------------------------------------------
def test_selection_and_gates_are_saved_and_a_loaded_adapter_injects_only_the_selected_modules(tmp_path):
    module, cb, t = fit_flexora(max_steps=6)
    method: Flexora = cb.method  # type: ignore[assignment]
    batch = val_batch(8, seed=5)
    y = logits_of(module.model, batch)

    cb.save_adapter(module, tmp_path / "adapter")
    meta = read_flexora_metadata(tmp_path / "adapter")
    assert meta == method.summary()
    assert meta["phase"] == "retrain" and meta["selected"] == method.selected and len(meta["gate_logits"]) == 6
    fresh = bert_cls(0)
    ll.load_adapter(fresh, tmp_path / "adapter")
    assert set(ll.adapter_layers(fresh)) == set(method.selected_modules)
    assert torch.equal(logits_of(fresh, batch), y)
    assert ll.get_adapter_method(fresh).summary() == meta

    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    restored = ll.load_adapter_checkpoint(SequenceClassifier(bert_cls(0)), ckpt, target="model")
    assert set(ll.adapter_layers(restored.model)) == set(method.selected_modules)
    assert torch.equal(logits_of(restored.model, batch), y)
    assert ll.get_adapter_method(restored.model).summary() == meta


def test_search_phase_adapter_restores_the_gate_logits(tmp_path):
    model = build_tiny_bert(0)
    layers = ll.inject_adapter(model, "flexora", r=4, target_modules=TARGETS)
    method: Flexora = ll.get_adapter_method(model)  # type: ignore[assignment]
    method.set_gate_logits([0.25, -0.5], layers)
    ll.save_adapter(model, tmp_path / "a")
    fresh = build_tiny_bert(0)
    ll.load_adapter(fresh, tmp_path / "a")
    loaded: Flexora = ll.get_adapter_method(fresh)  # type: ignore[assignment]
    assert loaded.phase == "search" and loaded.summary() == method.summary()
    assert torch.equal(loaded.gate_logits.detach(), torch.tensor([0.25, -0.5]))
    assert [layer.gate for layer in ll.adapter_layers(fresh).values()] == [l.gate for l in layers.values()]
    assert all(isinstance(layer, FlexoraLinear) for layer in ll.adapter_layers(fresh).values())


def test_gate_step_under_bf16_autocast_in_a_trainer():
    """The gate step runs inside the precision plugin's autocast, as the training step does."""
    module, cb, t = fit_flexora(max_steps=5, precision="bf16-mixed")
    method: Flexora = cb.method  # type: ignore[assignment]
    assert method.phase == "retrain" and method.gate_steps == 3
    assert method.last_gate_loss is not None and torch.isfinite(torch.tensor(method.last_gate_loss))
    logits = torch.tensor(method.summary()["gate_logits"])
    assert torch.isfinite(logits).all() and not torch.equal(logits, torch.zeros_like(logits))


# ---- resuming a fit from a checkpoint (ckpt_path) ----------------------------------------------------
class OrderedGlue(TinyGlue):
    """Two training batches per epoch, no shuffling: a fit resumed at an epoch boundary sees the same
    batches as an uninterrupted one (Lightning does not restore a DataLoader generator's state)."""

    def __init__(self) -> None:
        super().__init__(n_train=16, n_val=24)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8)


class StopAfterEpoch(pl.Callback):
    """Ends the fit after ``epochs`` epochs of a longer ``max_epochs``: the LR schedule, built from
    the whole fit's length, is the same as the uninterrupted fit's."""

    def __init__(self, epochs: int | None) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epochs is not None and trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit_epochs(stop_after: int | None = None, ckpt: str | None = None, save: str | None = None,
                max_epochs: int = 4, accumulate: int = 1, search_steps: int = 3,
                **kw) -> tuple[SequenceClassifier, ll.AdapterCallback]:
    """``max_epochs`` epochs of 2 batches (or the first ``stop_after`` epochs of them)."""
    pl.seed_everything(0, verbose=False)
    module = SequenceClassifier(bert_cls(0), lr=1e-2, warmup_ratio=0.25)
    cb = flexora_callback(search_steps=search_steps, gate_batch_size=4, **kw)
    t = pl.Trainer(max_epochs=max_epochs, callbacks=[cb, StopAfterEpoch(stop_after)], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu", accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, datamodule=OrderedGlue(), ckpt_path=ckpt, weights_only=True)
    if save is not None:
        t.save_checkpoint(save)
    return module, cb


def _assert_same_fit(a: tuple[SequenceClassifier, ll.AdapterCallback],
                     b: tuple[SequenceClassifier, ll.AdapterCallback]) -> None:
    (ma, ca), (mb, cb) = a, b
    assert ca.method.summary() == cb.method.summary()
    assert set(ll.adapter_layers(ma.model)) == set(ll.adapter_layers(mb.model))
    sa, sb = ll.adapter_state_dict(ma.model), ll.adapter_state_dict(mb.model)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    head_a, head_b = ma.model.classifier.weight, mb.model.classifier.weight
    torch.testing.assert_close(head_b, head_a, rtol=1e-6, atol=1e-7)


def test_a_fit_resumed_mid_search_equals_the_uninterrupted_fit(tmp_path):
    # reinit=False: the selection then draws no random numbers, so the resumed process's RNG state
    # (which Lightning does not restore) cannot matter and the two fits must agree exactly
    full = _fit_epochs(reinit=False)  # 8 steps: gates at steps 1-3, selection at 3, retraining 4-8
    ckpt = str(tmp_path / "mid_search.ckpt")
    part, cb_part = _fit_epochs(1, save=ckpt, reinit=False)  # step 2: mid-search, Adam state on α̂
    assert cb_part.method.phase == "search" and cb_part.method.gate_steps == 2
    meta = torch.load(ckpt, weights_only=True)["lightning_lora"]["layer_metadata"]
    assert meta["gate_optimizer"]["step"] == 2.0 and meta["gate_micro_batches_used"] == 4  # gate_batches=2
    resumed = _fit_epochs(ckpt=ckpt, reinit=False)
    assert resumed[1].method.phase == "retrain" and resumed[1].method.selected_at_step == 3
    _assert_same_fit(full, resumed)


def test_a_fit_resumed_mid_search_with_gradient_accumulation_equals_the_uninterrupted_fit(tmp_path):
    """``accumulate_grad_batches=2``: Lightning restores ``global_step`` after ``on_fit_start``, so a step
    remembered there made the resumed fit take a gate step after its first micro-batch (4 gate steps
    where the uninterrupted fit took 3)."""
    kw = dict(max_epochs=4, accumulate=2, search_steps=3, reinit=False)
    full = _fit_epochs(**kw)  # 4 optimizer steps: gates at 1-3, selection at 3
    ckpt = str(tmp_path / "mid_search_accum.ckpt")
    _, cb_part = _fit_epochs(2, save=ckpt, **kw)  # optimizer step 2: mid-search
    assert cb_part.method.phase == "search" and cb_part.method.gate_steps == 2
    resumed = _fit_epochs(ckpt=ckpt, **kw)
    assert resumed[1].method.gate_steps == full[1].method.gate_steps == 3
    _assert_same_fit(full, resumed)


@pytest.mark.parametrize("schedule", ["fresh", "continue"])
def test_a_fit_resumed_after_the_selection_equals_the_uninterrupted_fit(tmp_path, schedule):
    full = _fit_epochs(retrain_schedule=schedule)
    ckpt = str(tmp_path / "retrain.ckpt")
    _, cb_part = _fit_epochs(3, save=ckpt, retrain_schedule=schedule)  # step 6: selected at 3, others removed
    selected = set(cb_part.method.selected_modules)
    assert cb_part.method.phase == "retrain" and 0 < len(selected) < 6, "vacuous: nothing or everything selected"
    resumed = _fit_epochs(ckpt=ckpt, retrain_schedule=schedule)
    assert set(resumed[1].layers) == selected  # the callback's live layers lost the removed ones
    _assert_same_fit(full, resumed)


def test_a_fit_resumed_after_zero_exclusion_equals_the_uninterrupted_fit(tmp_path):
    full = _fit_epochs(exclusion="zero")
    ckpt = str(tmp_path / "zero.ckpt")
    _fit_epochs(3, save=ckpt, exclusion="zero")
    _assert_same_fit(full, _fit_epochs(ckpt=ckpt, exclusion="zero"))
