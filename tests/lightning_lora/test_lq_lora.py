"""LQ-LoRA method (METHODS.md §2): layer from (Q, L1, L2), packed storage, ILP planning, Fisher,
save/load of the quantized model and adapter, training through AdapterCallback."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.methods import lq_lora
from lightning_lora.methods.lq_lora import quantize_model, quantized_storage_bits, save_fisher, unload_dense
from lightning_lora.quant import estimate_fisher, lq_decompose, quantize_dequantize

pytestmark = [pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers.*")]


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


KW = dict(r=4, alpha=8.0, max_iters=5, target_modules=["fc1", "fc2"])


def test_layer_is_q_plus_l1l2_and_only_ab_train():
    net = Net()
    w, b = net.fc2.weight.detach().clone(), net.fc2.bias.detach().clone()
    layers = ll.inject_adapter(net, "lq_lora", **{**KW, "quant": "nf3", "svd": "exact"})
    layer = layers["fc2"]
    dec = lq_decompose(w, 4, "nf3", max_iters=5, svd="exact")
    s = layer.scaling
    torch.testing.assert_close(layer.lora_A.data, dec.L2 / math.sqrt(s))
    torch.testing.assert_close(layer.lora_B.data, dec.L1 / math.sqrt(s))
    torch.testing.assert_close(layer.base_layer.weight, dec.q_dense)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ dec.q_dense.t() + x @ (dec.L1 @ dec.L2).t() + b, atol=1e-5, rtol=1e-5)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.base_layer.bias.grad is None


def test_dense_weight_is_gone_and_storage_matches_accounting():
    net = Net()
    layers = ll.inject_adapter(net, "lq_lora", **{**KW, "quant": "nf3"})
    assert not any(isinstance(m, nn.Linear) and m is not net.head for m in net.modules())
    for layer in layers.values():
        q = layer.base_layer
        assert {n for n, _ in q.named_parameters()} == {"bias"}
        assert q.codes.dtype == torch.uint8 and q.storage_bytes() * 8 == q.storage_bits()
    bits, numel = quantized_storage_bits(net)
    assert numel == 32 * 64 + 64 * 64 and bits / numel < 4.0  # vs 32 dense; padding of small matrices


def test_lq_lora_closer_to_base_than_plain_nf():
    torch.manual_seed(0)
    net = Net()
    for lin in (net.fc1, net.fc2):  # pretrained-like weights: a strong low-rank part plus noise
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.out_features, 4) @ torch.randn(4, lin.in_features) / 2
                             + 0.05 * torch.randn_like(lin.weight))
    ref = {n: getattr(net, n).weight.detach().clone() for n in ("fc1", "fc2")}
    layers = ll.inject_adapter(net, "lq_lora", **{**KW, "quant": "nf2", "max_iters": 20})
    for name, layer in layers.items():
        lq_err = (layer.merged_weight() - ref[name]).norm()
        nf_err = (quantize_dequantize(ref[name], "nf2") - ref[name]).norm()
        assert lq_err < nf_err


def test_save_load_restores_without_decomposition(tmp_path, monkeypatch):
    net = Net()
    ll.inject_adapter(net, "lq_lora", **{**KW, "matrix_configs": {"fc1": "nf2", "fc2": "b3-s4-bf16-B16-G16"}})
    x = torch.randn(4, 32)
    y = net(x)
    ll.save_adapter(net, tmp_path / "a")

    def no_decompose(*a, **k):
        raise AssertionError("loading must not re-run the decomposition")

    monkeypatch.setattr(lq_lora, "lq_decompose", no_decompose)
    fresh = Net()
    ll.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), y)
    assert fresh.fc2.quant_config.name == "b3-s4-bf16-B16-G16" and fresh.fc1.quant_config.name == "b2-s8-fp32-B64-G256"


def test_merge_raises_and_unload_dense_matches():
    net = Net()
    ll.inject_adapter(net, "lq_lora", **KW)
    with torch.no_grad():
        for layer in ll.adapter_layers(net).values():
            layer.lora_B.mul_(1.5)
    x = torch.randn(4, 32)
    y = net(x)
    with pytest.raises(RuntimeError, match="re-quantiz"):
        ll.merge_adapter(net)
    unload_dense(net)
    assert isinstance(net.fc1, nn.Linear) and ll.get_adapter_method(net) is None
    torch.testing.assert_close(net(x), y, atol=1e-5, rtol=1e-5)


def test_budget_plan_respects_budget():
    net = Net()
    quantize_model(net, r=4, budget=3.4, configs=["nf2", "nf3", "nf4"], max_iters=3, target_modules=["fc1", "fc2"])
    bits, numel = quantized_storage_bits(net)
    assert bits / numel <= 3.4  # exact storage; both nf3 would be 3.69 (padding of small matrices)
    chosen = ll.get_adapter_method(net).config.matrix_configs
    assert set(chosen) == {"fc1", "fc2"} and len(set(chosen.values())) == 2  # a mix of bit widths


def test_fisher_is_sum_of_squared_per_example_grads(tmp_path):
    net = Net()
    x, y = torch.randn(3, 32), torch.tensor([0, 2, 1])
    loss_fn = lambda model, ex: F.cross_entropy(model(ex["x"]), ex["y"])  # noqa: E731
    fisher = estimate_fisher(net, [{"x": x, "y": y}], loss_fn, {"fc1": net.fc1.weight, "fc2": net.fc2.weight})
    manual = torch.zeros_like(net.fc2.weight)
    for i in range(3):
        g, = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), net.fc2.weight)
        manual += g.square()
    torch.testing.assert_close(fisher["fc2"], manual)
    assert not any(p.requires_grad is False for p in net.parameters())  # flags restored
    path = tmp_path / "fisher.safetensors"
    save_fisher(fisher, str(path))
    w2 = net.fc2.weight.detach().clone()
    ll.inject_adapter(net, "lq_lora", **{**KW, "fisher_path": str(path)})
    expected = lq_decompose(w2, 4, "nf4", max_iters=5, fisher=fisher["fc2"])
    torch.testing.assert_close(net.fc2.lora_B.data * math.sqrt(net.fc2.scaling), expected.L1)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=1e-2)


def test_trains_through_adapter_callback_and_checkpoint_carries_q(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 32, generator=g), torch.randint(0, 3, (16,), generator=g)), batch_size=4)
    module = Module()
    cb = ll.AdapterCallback("lq_lora", target="net", **KW)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.callbacks.append(cb)
    cb.setup(trainer, module, "fit")  # inject now to record the initial state
    before = {k: v.clone() for k, v in ll.adapter_state_dict(module.net).items()}
    trainer.fit(module, data)
    after = ll.adapter_state_dict(module.net)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.endswith("lora_A") or k.endswith("lora_B")), k
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert "net.fc1.base_layer.codes" in ckpt["state_dict"] and "net.fc1.base_layer.bias" not in ckpt["state_dict"]
    fresh = ll.load_adapter_checkpoint(Module(), tmp_path / "x.ckpt", target="net")
    x = torch.randn(3, 32)
    assert torch.equal(fresh.net(x), module.net(x))


def test_failed_load_leaves_the_dense_model(tmp_path):
    """A load that fails (an adapter of other widths) puts back the dense ``nn.Linear`` modules and their
    weights: unloading the half-made LQ-LoRA layers alone would leave their quantized bases in place."""
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    ll.inject_adapter(src, "lq_lora", r=4, max_iters=2, target_modules=["0", "2"])
    ll.save_adapter(src, tmp_path)
    dst = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ll.AdapterFormatError):
        ll.load_adapter(dst, tmp_path)
    assert [type(m) for m in dst] == [nn.Linear, nn.Tanh, nn.Linear]
    after = dst.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in dst.parameters())
