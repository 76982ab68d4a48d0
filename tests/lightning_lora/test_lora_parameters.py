"""LoRA on bare parameters (``LoRAConfig.target_parameters``, :class:`LoRAParameters`): the fused expert
weights of transformers 5's mixture-of-experts layers (a tiny Mixtral, whose ``experts`` module holds
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)) and a plain 2-D weight. PEFT's directories
load both ways with PEFT's outputs; the update is one rank-r matrix per expert; merging is exact; only
the factors train; the refusals leave the model as it was."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_modules import LoRAParameters
from tests.conftest import randomize_adapter

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _perturb(model: nn.Module) -> None:
    randomize_adapter(model, match="lora_B")


def _peft(tmp_path, targets=EXPERTS):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_mixtral(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                target_parameters=targets, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    return theirs


def test_expert_parameters_start_at_the_base_and_train_only_their_factors():
    base = _mixtral()
    model = copy.deepcopy(base)
    layers = ll.inject_adapter(model, "lora", r=2, target_modules=[], target_parameters=EXPERTS)
    assert sorted(layers) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    layer = layers["model.layers.0.mlp.experts"]
    assert isinstance(layer, LoRAParameters) and layer.names == ["gate_up_proj", "down_proj"]
    # (E, 2I, H) read as (in, out) = (H, 2I), swapped as PEFT does: A (r·E, H), B (2I, r·E)
    assert layer.get_parameter("lora_A__gate_up_proj").shape == (8, 16)
    assert layer.get_parameter("lora_B__gate_up_proj").shape == (48, 8)
    torch.testing.assert_close(model(IDS).logits, base(IDS).logits, atol=0, rtol=0)
    _perturb(model)
    model.train()
    model(IDS).logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, name
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_update_is_one_rank_r_matrix_per_expert_and_merges_exactly():
    base = _mixtral()
    model = copy.deepcopy(base)
    layers = ll.inject_adapter(model, "lora", r=2, alpha=4, target_modules=[], target_parameters=EXPERTS)
    _perturb(model)
    layer = layers["model.layers.0.mlp.experts"]
    deltas = layer.delta_weights()
    a = layer.get_parameter("lora_A__down_proj").reshape(4, 2, -1)  # (E, r, in = I)
    b = layer.get_parameter("lora_B__down_proj").reshape(16, 2, 4)  # (out = H, r, E)
    for e in range(4):  # down_proj[e] is (H, I): expert e's own B_e A_e, scaled
        torch.testing.assert_close(deltas["down_proj"][e], 2.0 * b[:, :, e] @ a[e], atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(deltas["gate_up_proj"][e]) <= 2
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, lyr in layers.items():
            for pname, dw in lyr.delta_weights().items():
                getattr(reference.get_submodule(name), pname).add_(dw)
    expected = model(IDS).logits
    torch.testing.assert_close(expected, reference(IDS).logits, atol=1e-5, rtol=0)
    ll.merge_adapter(model)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)
    ll.unmerge_adapter(model)
    torch.testing.assert_close(layer.base_layer.down_proj, base.model.layers[0].mlp.experts.down_proj, atol=1e-6, rtol=0)
    with ll.disable_adapter(model):
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, atol=1e-5, rtol=0)
    ll.unload(model, merge=True)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)


def test_peft_directories_load_both_ways_with_the_same_outputs(tmp_path):
    import peft

    theirs = _peft(tmp_path)
    expected = theirs(IDS).logits.detach()
    assert (expected - _mixtral()(IDS).logits).abs().max() > 1e-2
    ours = _mixtral()
    ll.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(ours(IDS).logits, expected, atol=1e-5, rtol=0)
    ll.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_mixtral(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(IDS).logits, expected, atol=1e-5, rtol=0)
    again = _mixtral()
    ll.load_adapter(again, tmp_path / "ours")
    torch.testing.assert_close(again(IDS).logits, ours(IDS).logits, atol=0, rtol=0)


def test_one_expert_parameter_and_a_plain_weight():
    """One targeted parameter per module (PEFT's single wrapper: ``lora_A.weight``), and a 2-D weight
    of a module that is not a target (``ΔW = s·B A``)."""
    model = _mixtral()
    layers = ll.inject_adapter(model, "lora", r=2, target_modules=[],
                               target_parameters=["experts.down_proj", "layers.0.self_attn.o_proj.weight"])
    assert layers["model.layers.0.mlp.experts"].file_key_map == {"lora_A__down_proj": "lora_A.weight",
                                                                 "lora_B__down_proj": "lora_B.weight"}
    o_proj = layers["model.layers.0.self_attn.o_proj"]
    _perturb(model)
    torch.testing.assert_close(o_proj.delta_weight(), o_proj.scaling * o_proj.get_parameter("lora_B__weight")
                               @ o_proj.get_parameter("lora_A__weight"), atol=1e-6, rtol=0)
    expected = model(IDS).logits
    ll.merge_adapter(model)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)


def test_trace_equals_eager():
    model = _mixtral()
    ll.inject_adapter(model, "lora", r=2, target_modules=[], target_parameters=["experts.down_proj"])
    _perturb(model)
    layer = model.model.layers[0].mlp.experts
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    top = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1]])
    weights = torch.full((5, 2), 0.5)
    traced = torch.jit.trace(layer, (x, top, weights), check_trace=False)
    torch.testing.assert_close(traced(x, top, weights), layer(x, top, weights), atol=1e-6, rtol=0)
    assert isinstance(layer.base_layer.down_proj, nn.Parameter)


def test_refusals_leave_the_model_as_it_was():
    model = _mixtral()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matched no parameter"):
        ll.inject_adapter(model, "lora", r=2, target_modules=[], target_parameters=["experts.nothing"])
    with pytest.raises(ValueError, match="which target_modules adapts already"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["o_proj"], target_parameters=["o_proj.weight"])
    with pytest.raises(ValueError, match="dropout=0.1 cannot act on a parameter's update"):
        ll.inject_adapter(model, "lora", r=2, dropout=0.1, target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(ValueError, match="DoRA is not implemented for bare parameters"):
        ll.inject_adapter(model, "lora", r=2, use_dora=True, target_modules=[], target_parameters=EXPERTS)
    assert not ll.adapter_layers(model) and ll.get_adapter_method(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    with pytest.raises(ValueError, match="'<module>.<parameter>' names"):
        ll.LoRAConfig(target_parameters=["gate_up_proj"])
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return (w + w.t()) / 2

    sym = nn.ModuleDict({"lin": nn.Linear(4, 4)})
    parametrize.register_parametrization(sym["lin"], "weight", Symmetric())
    with pytest.raises(ValueError, match="lin.weight is computed by a torch.nn.utils.parametrize parametrization"):
        ll.inject_adapter(sym, "lora", r=2, target_modules=[], target_parameters=["lin.weight"])
    for method in ("ffa_lora", "flexora", "gradnorm_lorp"):  # built on LoRA's config, for linear layers only
        with pytest.raises(ValueError, match=f"options of the 'lora' method, not of '{method}'"):
            ll.make_config(method, target_modules=[], target_parameters=EXPERTS)
        with pytest.raises(ValueError, match=f"not of '{method}'"):
            ll.make_config(method, ensure_weight_tying=True)
    with pytest.raises(ValueError, match="named adapters do not support target_parameters"):
        ll.add_adapter(_mixtral(), "a", "lora", ll.LoRAConfig(target_modules=[], target_parameters=EXPERTS))
    injected = _mixtral()  # a second, named adapter beside an injected one: refused before anything changes
    ll.inject_adapter(injected, "lora", r=2, target_modules=[], target_parameters=["experts.down_proj"])
    with pytest.raises(TypeError, match="layer 'model.layers.0.mlp.experts' \\(MixtralExperts\\) is one that named "
                                        "adapters do not support"):
        ll.add_adapter(injected, "b", "lora", ll.LoRAConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(injected.model.layers[0].mlp.experts, LoRAParameters)
    assert type(injected.model.layers[0].self_attn.q_proj) is nn.Linear


class TransposedExperts(nn.Module):
    """Experts stored (E, in, out), flagged ``is_transposed`` as transformers does for such layers."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (3, N, 6): one batch per expert
        return torch.bmm(x, self.weight)


def test_transposed_expert_layout_matches_peft():
    import peft

    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3))
    ours = nn.ModuleDict({"experts": TransposedExperts()})
    layers = ll.inject_adapter(ours, "lora", r=2, target_modules=[], target_parameters=["experts.weight"])
    _perturb(ours)
    layer = layers["experts"]
    assert layer.get_parameter("lora_A__weight").shape == (6, 6) and layer.get_parameter("lora_B__weight").shape == (5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(nn.ModuleDict({"experts": TransposedExperts()}),
                                     peft.LoraConfig(r=2, lora_alpha=8, target_modules=[], target_parameters=["experts.weight"]))
    with torch.no_grad():
        wrapper = theirs.base_model.model["experts"]
        wrapper.lora_A["default"].weight.copy_(layer.get_parameter("lora_A__weight"))
        wrapper.lora_B["default"].weight.copy_(layer.get_parameter("lora_B__weight"))
    torch.testing.assert_close(ours["experts"](x), theirs.base_model.model["experts"](x), atol=1e-5, rtol=0)
    a = layer.get_parameter("lora_A__weight").reshape(3, 2, 6)
    b = layer.get_parameter("lora_B__weight").reshape(5, 2, 3)
    torch.testing.assert_close(layer.delta_weight()[1], layer.scaling * a[1].t() @ b[:, :, 1].t(), atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_cuda_bf16_autocast_training_and_merge():
    model = _mixtral().cuda()
    ll.inject_adapter(model, "lora", r=2, target_modules=[], target_parameters=EXPERTS)
    _perturb(model)
    ids = IDS.cuda()
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids).logits.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        ll.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
