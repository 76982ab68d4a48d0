"""FFA-LoRA specifics (METHODS.md §16 invariants 1-4): A0 frozen and saved, exact FedAvg, payload,
the α ↔ lr equivalence under SGD, and the PEFT export."""

from __future__ import annotations

import json

import pytest
import peft
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.state import CONFIG_NAME
from lightning_lora.methods.ffa import FFALoRALinear, fedavg


def _model(seed: int = 0, **kw) -> tuple[nn.Module, FFALoRALinear]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 32))
    layer = ll.inject_adapter(model, "ffa_lora", dict(r=4, **kw), target_modules=["0"])["0"]
    return model, layer  # type: ignore[return-value]


def test_a_is_a_frozen_buffer_and_scaling_defaults_to_one():
    model, layer = _model()
    assert "lora_A" not in dict(layer.named_parameters()) and "lora_A" in dict(layer.named_buffers())
    assert not layer.lora_A.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_B"]
    assert layer.scaling == 1.0  # alpha = r by default (paper: α = r = 8)
    assert _model(alpha=8)[1].scaling == 2.0
    with pytest.raises(ValueError, match="use_dora"):
        _model(use_dora=True)


def test_a0_is_saved_and_loaded_not_redrawn(tmp_path):
    model, layer = _model(seed=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    ll.save_adapter(model, tmp_path / "a")
    torch.manual_seed(99)  # a client with another RNG state draws another A at injection ...
    fresh = nn.Sequential(nn.Linear(48, 32))
    fresh.load_state_dict({"0.weight": layer.base_layer.weight, "0.bias": layer.base_layer.bias})
    ll.load_adapter(fresh, tmp_path / "a")  # ... and gets the server's A0 from the file
    assert torch.equal(fresh[0].lora_A, layer.lora_A)
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), model(x))


def test_shared_seed_gives_identical_a0_on_every_client():
    a = _model(seed=1, a0_seed=7)[1].lora_A
    b = _model(seed=2, a0_seed=7)[1].lora_A
    c = _model(seed=1, a0_seed=8)[1].lora_A
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_b_zero_gives_base_output_and_a_gets_no_gradient():
    model, layer = _model()
    x = torch.randn(5, 48)
    with ll.disable_adapter(model):
        y0 = model(x)
    y = model(x)
    assert torch.equal(y, y0)
    y.square().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad is None


def _local_sgd(model: nn.Module, x: torch.Tensor, t: torch.Tensor, lr: float, steps: int = 3) -> None:
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        opt.step()


def _delta(layer) -> torch.Tensor:
    return layer.delta_weight().detach()


@pytest.mark.parametrize("method", ["ffa_lora", "lora"])
def test_fedavg_of_b_is_the_average_of_client_updates(method):
    """Invariant 2: after one round, global ΔW == mean of client ΔWs for FFA; LoRA shows a gap."""
    torch.manual_seed(0)
    server = nn.Sequential(nn.Linear(48, 32))
    ll.inject_adapter(server, method, dict(r=4), target_modules=["0"])
    init = ll.adapter_state_dict(server)
    clients, deltas, weights = [], [], [10.0, 30.0, 60.0]
    for k in range(3):
        client = nn.Sequential(nn.Linear(48, 32))
        client.load_state_dict({"0.weight": server[0].base_layer.weight, "0.bias": server[0].base_layer.bias})
        ll.inject_adapter(client, method, dict(r=4), target_modules=["0"])
        client.load_state_dict({k2: v.clone() for k2, v in init.items()}, strict=False)
        g = torch.Generator().manual_seed(k)
        _local_sgd(client, torch.randn(16, 48, generator=g), torch.randn(16, 32, generator=g), lr=0.5)
        clients.append(ll.adapter_state_dict(client))
        deltas.append(_delta(client[0]))
    expected = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    if method == "ffa_lora":
        avg = fedavg(clients, weights)
    else:  # vanilla LoRA: average A and B separately
        avg = {k: sum(w * c[k] for w, c in zip(weights, clients)) / sum(weights) for k in clients[0]}
    server.load_state_dict(avg, strict=False)
    gap = (_delta(server[0]) - expected).abs().max().item()
    if method == "ffa_lora":
        assert gap < 1e-6
    else:
        assert gap > 1e-4, "vanilla LoRA averaging should not be exact"


def test_fedavg_refuses_clients_with_different_a0():
    s1 = ll.adapter_state_dict(_model(seed=0)[0])
    s2 = ll.adapter_state_dict(_model(seed=1)[0])
    with pytest.raises(ValueError, match="A0 differs"):
        fedavg([s1, s2])


def test_payload_is_m_r_per_module_and_ratio_to_lora():
    """Invariant 3: communicated (trainable) numbers m·r per module; ratio to LoRA m/(m+n)."""
    model, layer = _model()
    payload = {k: v for k, v in ll.adapter_state_dict(model).items() if not k.endswith("lora_A")}
    n_ffa = sum(v.numel() for v in payload.values())
    assert n_ffa == 32 * 4 and sum(v.numel() * v.element_size() for v in payload.values()) == 32 * 4 * 4
    torch.manual_seed(0)
    lora = nn.Sequential(nn.Linear(48, 32))
    ll.inject_adapter(lora, "lora", dict(r=4), target_modules=["0"])
    n_lora = sum(p.numel() for p in ll.trainable_parameters(lora))
    assert n_ffa / n_lora == pytest.approx(32 / (32 + 48))


def test_sgd_scale_c_equals_lr_times_c_squared():
    """Invariant 4: SGD with (s·c, lr) gives the same ΔW trajectory as (s, lr·c²)."""
    c, lr = 3.0, 0.05
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(16, 48, generator=g), torch.randn(16, 32, generator=g)
    a, la = _model(seed=0, alpha=4 * c)  # s = c
    b, lb = _model(seed=0, alpha=4)  # s = 1
    assert torch.equal(la.lora_A, lb.lora_A)
    for _ in range(4):
        _local_sgd(a, x, t, lr, steps=1)
        _local_sgd(b, x, t, lr * c * c, steps=1)
        torch.testing.assert_close(_delta(la), _delta(lb), atol=1e-6, rtol=1e-5)
    assert _delta(la).abs().max() > 1e-3


def test_saved_directory_loads_in_peft_as_lora(model_builders, tmp_path):
    ours = model_builders["bert"](0)
    ll.inject_adapter(ours, "ffa_lora", dict(r=4, alpha=8), target_modules=["query", "value"])
    with torch.no_grad():
        for p in ll.trainable_parameters(ours):
            p.normal_(std=0.2)
    ll.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == 8
    x = {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))}
    theirs = peft.PeftModel.from_pretrained(model_builders["bert"](0), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).last_hidden_state, ours(**x).last_hidden_state, atol=1e-5, rtol=0)
    # and it reloads here as FFA-LoRA (A0 frozen), not as plain LoRA
    again = model_builders["bert"](0)
    ll.load_adapter(again, tmp_path / "a")
    assert ll.get_adapter_method(again).config.method == "ffa_lora"
    assert all(n.endswith("lora_B") for n, p in again.named_parameters() if p.requires_grad)
