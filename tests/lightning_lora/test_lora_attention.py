"""LoRA in torch's own transformer modules: ``nn.MultiheadAttention`` (:class:`LoRAMultiheadAttention`)
and the layers ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` read by weight instead of
calling them (:attr:`AdapterLayer.weight`).

Before: an adapted ``linear1`` made ``nn.TransformerEncoderLayer`` fail in eval mode (its inference
fast path reads ``linear1.weight``), targeting ``out_proj`` failed the same way in every mode, and
the packed ``in_proj_weight`` could not be adapted at all. PEFT 0.21.2 runs the first case with the
base weights (the adapter silently dropped in eval mode) and applies the ``out_proj`` update twice in
its attention layer (huggingface/peft PR #3774, open): the reference here is the base module with
``W + s·B A`` written into its weights."""

from __future__ import annotations

import copy
import warnings

import onnxruntime
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_modules import LoRAMultiheadAttention
from tests.conftest import mha_fastpath_off, randomize_adapter as _perturb


class Encoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (E = 16, 2 heads, no dropout, batch first)."""

    def __init__(self, seed: int = 0, norm_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)


def _x(seed: int = 1, shape: tuple[int, ...] = (3, 5, 16)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference(model: nn.Module, base: nn.Module) -> nn.Module:
    """``base`` (a copy) with every adapter's update written into its weights by hand: ``W + s·B A``
    for the attention's packed input and its output projection, each once."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in ll.adapter_layers(model).items():
            target = ref.get_submodule(name)
            if isinstance(layer, LoRAMultiheadAttention):
                target.in_proj_weight += layer.scaling * layer.lora_B @ layer.lora_A
                target.out_proj.weight += layer.scaling * layer.lora_out_B @ layer.lora_out_A
            else:
                target.weight += layer.delta_weight()
    return ref


TARGETS = {
    "mlp": ["linear1", "linear2"],
    "out_proj": ["out_proj"],
    "attention": ["self_attn"],
    "all": ["self_attn", "linear1", "linear2"],
}


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_computes_the_adapted_weights_in_train_and_eval_mode(targets, norm_first):
    base = Encoder(norm_first=norm_first)
    model = copy.deepcopy(base)
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, alpha=8, target_modules=TARGETS[targets]))
    _perturb(model)
    ref = _reference(model, base)
    x = _x()
    ref.eval()
    with torch.no_grad():
        expected = ref(x)
        assert (expected - base.eval()(x)).abs().max() > 0.05  # the update changes the output
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():  # eval + no_grad: nn.TransformerEncoderLayer's fused fast path
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x).detach(), expected, atol=1e-5, rtol=0)
    with mha_fastpath_off(), torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_encoder_stack_fast_path_with_a_padding_mask_runs_the_adapter():
    """nn.TransformerEncoder's nested-tensor path (eval, a key padding mask) reads every weight of its
    first layer and of the attention: the padded positions come back as zeros, the others adapted."""
    torch.manual_seed(0)
    base = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                 enable_nested_tensor=True)
    model = copy.deepcopy(base)
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn", "linear1"]))
    _perturb(model)
    ref = _reference(model, base).eval()
    model.eval()
    x = _x()
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[2, 4:] = True
    with torch.no_grad():
        got, expected = model(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)
    assert (expected[keep] - base.eval()(x, src_key_padding_mask=pad)[keep]).abs().max() > 0.05


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_matches_the_hand_merged_module_with_weights_and_masks(batch_first):
    torch.manual_seed(0)
    base = nn.MultiheadAttention(16, 4, bias=True, add_bias_kv=True, batch_first=batch_first)
    wrapper = nn.ModuleDict({"attn": copy.deepcopy(base)})
    ll.inject_adapter(wrapper, "lora", ll.LoRAConfig(r=3, alpha=6, target_modules=["attn"]))
    _perturb(wrapper)
    layer = wrapper["attn"]
    ref = _reference(wrapper, nn.ModuleDict({"attn": base}))["attn"]
    q = _x(2, (5, 3, 16))
    kv = _x(3, (7, 3, 16))
    if batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(4)) > 0.7
    out, weights = layer(q, kv, kv, attn_mask=mask, need_weights=True, average_attn_weights=False)
    ref_out, ref_weights = ref(q, kv, kv, attn_mask=mask, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)


def test_attention_starts_at_the_base_and_trains_only_its_four_factors():
    base = Encoder()
    model = copy.deepcopy(base)
    layers = ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn"]))
    layer = layers["enc.self_attn"]
    assert isinstance(layer, LoRAMultiheadAttention)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_out_B) == 0
    x = _x()
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "enc.self_attn.lora_A", "enc.self_attn.lora_B", "enc.self_attn.lora_out_A", "enc.self_attn.lora_out_B"}
    _perturb(model)
    model(x)[..., 0].sum().backward()  # (a sum over the last dim is constant after the LayerNorm)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert ll.parameter_counts(model)["trainable"] == 4 * (3 * 16) + 4 * 16 + 4 * 16 + 16 * 4


def test_attention_merge_unmerge_disable_and_unload():
    base = Encoder()
    model = copy.deepcopy(base)
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn"]))
    _perturb(model)
    model.eval()
    x = _x()
    adapted = model(x).detach()
    ll.merge_adapter(model)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    ll.unmerge_adapter(model)
    attn = model.enc.self_attn.base_layer
    torch.testing.assert_close(attn.in_proj_weight, base.enc.self_attn.in_proj_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.out_proj.weight, base.enc.self_attn.out_proj.weight, atol=1e-6, rtol=0)
    with ll.disable_adapter(model):  # (unmerge restored the weights to rounding)
        torch.testing.assert_close(model(x), base.eval()(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    ll.unload(model, merge=True)
    assert type(model.enc.self_attn) is nn.MultiheadAttention
    assert type(model.enc.self_attn.out_proj) is type(base.enc.self_attn.out_proj)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


def test_attention_save_load_round_trip_and_peft_file_names(tmp_path):
    model = Encoder()
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn", "linear1"]))
    _perturb(model)
    ll.save_adapter(model, tmp_path / "ours")
    loaded = Encoder()
    ll.load_adapter(loaded, tmp_path / "ours")
    x = _x()
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # the file's names and shapes are PEFT's own for the same targets
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(Encoder(), peft.LoraConfig(r=4, target_modules=["self_attn", "linear1"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}


def test_a_peft_attention_adapter_loads_and_computes_each_update_once(tmp_path):
    """PEFT's directory loads here with every tensor in place; its update is ``W + s·B A`` on both
    projections (PEFT 0.21.2's own forward adds the out_proj update twice: PR #3774)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(Encoder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["self_attn"],
                                                               init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    model = Encoder()
    ll.load_adapter(model, tmp_path / "peft")
    peft_layer = theirs.base_model.model.enc.self_attn
    layer = model.enc.self_attn
    torch.testing.assert_close(layer.lora_A, peft_layer.lora_A["default"].weight, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_out_B, peft_layer.base_layer.out_proj.lora_B["default"].weight, atol=0, rtol=0)
    ref = _reference(model, Encoder())
    x = _x()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
    # where the out_proj update is zero PEFT's forward is the same function
    with torch.no_grad():
        peft_layer.base_layer.out_proj.lora_B["default"].weight.zero_()
        layer.lora_out_B.zero_()
    theirs.train()
    model.train()
    torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=0)


def test_targeting_attention_and_every_linear_adapts_out_proj_once():
    model = Encoder()
    layers = ll.inject_adapter(model, "lora", ll.LoRAConfig(r=2, target_types=(nn.Linear, nn.MultiheadAttention)))
    assert sorted(layers) == ["enc.linear1", "enc.linear2", "enc.self_attn"]
    assert type(model.enc.self_attn.base_layer.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


@pytest.mark.parametrize("use_dora", [False, True])
def test_weight_property_gives_the_layers_gradients(use_dora):
    """``F.linear(x, layer.weight, layer.bias)``, what nn.MultiheadAttention does with out_proj, has the
    value and the gradients of calling the layer (DoRA's norm a constant in both)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6))
    ll.inject_adapter(net, "lora", ll.LoRAConfig(r=2, target_modules=["0"], use_dora=use_dora))
    _perturb(net)
    layer = net[0]
    x = _x(3, (4, 8))
    called = layer(x)
    (called ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    by_weight = nn.functional.linear(x, layer.weight, layer.bias)
    (by_weight ** 2).sum().backward()
    torch.testing.assert_close(by_weight, called, atol=1e-5, rtol=0)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)
    ll.merge_adapter(net)
    assert layer.weight is layer.base_layer.weight  # merged: the base weight holds the update


def test_weight_property_of_a_disabled_layer_is_the_base_weight_and_bf16_stays_finite():
    net = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    ll.inject_adapter(net, "lora", ll.LoRAConfig(r=2, target_modules=["0"]))
    _perturb(net)
    layer = net[0]
    assert layer.weight.dtype == torch.bfloat16 and torch.isfinite(layer.weight).all()
    assert not torch.equal(layer.weight, layer.base_layer.weight)
    with ll.disable_adapter(net):
        assert layer.weight is layer.base_layer.weight


def test_bf16_attention_stays_finite_and_close():
    base = Encoder()
    model = copy.deepcopy(base)
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn"]))
    _perturb(model)
    x = _x()
    fp32 = model(x).detach()
    model.to(torch.bfloat16)
    out = model(x.to(torch.bfloat16))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), fp32, atol=0.1, rtol=0.05)


def test_adapter_callback_trains_attention_and_exports(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Encoder()
            self.head = nn.Linear(16, 2)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.head(self.net(batch[0]).mean(1)), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(ll.trainable_parameters(self), lr=0.05)

    x, y = _x(5, (16, 5, 16)), torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = ll.AdapterCallback("lora", r=2, target="net", target_modules=["self_attn"], export_dir=tmp_path / "a")
    module = Module()
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    trainer.fit(module, loader)
    layer = module.net.enc.self_attn
    assert torch.count_nonzero(layer.lora_B) > 0 and torch.count_nonzero(layer.lora_out_B) > 0
    loaded = Encoder()
    ll.load_adapter(loaded, tmp_path / "a")
    module.net.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.net(x), atol=1e-6, rtol=0)


def test_trace_and_onnx_export_of_an_adapted_encoder_equal_eager(tmp_path):
    """torch.jit.trace (torch.func.functional_call refuses to run under it: the layer swaps the two
    weights by hand there) on new shapes, and the TorchScript ONNX export on new values. ``check_trace=False``: the
    unadapted nn.TransformerEncoderLayer fails trace's own re-run check too (its fast path under
    no_grad)."""
    model = Encoder()
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn", "linear1"]))
    _perturb(model)
    model.eval()
    traced = torch.jit.trace(model, (_x(),), check_trace=False)
    assert isinstance(model.enc.self_attn.base_layer.in_proj_weight, nn.Parameter)  # swapped back
    x = _x(9, (2, 7, 16))
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(traced(x), eager, atol=1e-5, rtol=0)
    # static shapes: torch's own attention does not export with dynamic axes this way (adapted or not)
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(model, (_x(),), str(path), dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(str(path))
    x = _x(10)
    with torch.no_grad():
        eager = model(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), eager, atol=1e-5, rtol=0)


#: what a method needs beyond the rank to be injected here
METHOD_KWARGS = {"allora": {"eta": 1.0}}


@pytest.mark.parametrize("method", [m for m in ll.available_methods() if ll.get_method(m).mergeable])
def test_every_mergeable_method_serves_its_weight_to_the_encoder(method):
    """Every method with a fixed update works where torch reads weights: the encoder layer's fused eval
    path gives the layer-by-layer result, and out_proj's adapter (reached only through its weight)
    gets gradients."""
    model = Encoder()
    ll.inject_adapter(model, method, target_modules=["linear1", "out_proj"], r=4, **METHOD_KWARGS.get(method, {}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    x = _x()
    model.train()
    model(x)[..., 0].sum().backward()
    out_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and ".out_proj." in n]
    assert out_grads and sum(0 if g is None else g.abs().sum() for g in out_grads) > 0
    model.eval()
    with torch.no_grad():
        fused = model(x)
        with mha_fastpath_off():
            layer_by_layer = model(x)
    torch.testing.assert_close(fused, layer_by_layer, atol=1e-5, rtol=0)


def test_lora_only_bias_trains_both_attention_biases(tmp_path):
    model = Encoder()
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=2, target_modules=["self_attn"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"enc.self_attn.base_layer.in_proj_bias", "enc.self_attn.base_layer.out_proj.bias"} <= trainable
    assert not any("linear" in n or "norm" in n for n in trainable)
    _perturb(model)
    with torch.no_grad():
        model.enc.self_attn.base_layer.in_proj_bias.add_(0.5)
    ll.save_adapter(model, tmp_path)
    loaded = Encoder()
    ll.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(loaded(_x()), model(_x()), atol=0, rtol=0)


# ---- refusals --------------------------------------------------------------------------------
def test_attention_refusals():
    with pytest.raises(ValueError, match="DoRA is not implemented for nn.MultiheadAttention"):
        ll.inject_adapter(Encoder(), "lora", ll.LoRAConfig(r=2, target_modules=["self_attn"], use_dora=True))
    separate = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2, kdim=8, vdim=8)})
    with pytest.raises(ValueError, match="kdim/vdim"):
        ll.inject_adapter(separate, "lora", ll.LoRAConfig(r=2, target_modules=["attn"]))
    assert not ll.adapter_layers(separate)
    with pytest.warns(UserWarning, match="dropout=0.1 does not apply"):
        ll.inject_adapter(Encoder(), "lora", ll.LoRAConfig(r=2, target_modules=["self_attn"], dropout=0.1))
    with pytest.raises(TypeError, match="named adapters cannot adapt nn.MultiheadAttention"):
        ll.add_adapter(Encoder(), "a", "lora", ll.LoRAConfig(r=2, target_modules=["self_attn"]))
    single = Encoder()
    ll.inject_adapter(single, "lora", ll.LoRAConfig(r=2, target_modules=["self_attn"]))
    with pytest.raises(TypeError, match="named adapters do not support"):
        ll.add_adapter(single, "b", "lora", ll.LoRAConfig(r=2, target_modules=["linear1"]))


def test_input_dependent_method_has_no_weight_and_runs_with_the_fast_path_off():
    """SMoRA's gates depend on the input: the layer has no ``weight`` (so the encoder layer's fast
    path, which reads linear1.weight, cannot run it); with the fast path off, the layer is called."""
    model = Encoder()
    ll.inject_adapter(model, "smora", r=8, top_k=2, target_modules=["linear1"])
    assert not hasattr(model.enc.linear1, "weight")
    model.eval()
    with torch.no_grad(), pytest.raises(AttributeError, match="weight"):
        model(_x())
    with mha_fastpath_off(), torch.no_grad():
        assert torch.isfinite(model(_x())).all()


def test_compiled_adapted_encoder_layer_equals_eager():
    model = Encoder()
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn", "linear1"]))
    _perturb(model)
    x = _x()
    eager = model(x)
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    compiled[..., 0].sum().backward()
    assert model.enc.self_attn.lora_out_B.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cuda_bf16_fast_path_and_autocast_training():
    """On CUDA: a bf16 encoder's fused eval path (attention, feed-forward) runs the adapted weights,
    and bf16 autocast training of an fp32 one gives finite, non-zero gradients to all four factors."""
    model = Encoder().cuda().to(torch.bfloat16)
    ll.inject_adapter(model, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn", "linear1", "linear2"]))
    _perturb(model)
    x = _x().cuda()
    model.train()
    y_train = model(x.to(torch.bfloat16)).detach().float()
    model.eval()
    with torch.no_grad():
        y_eval = model(x.to(torch.bfloat16)).float()
    base = Encoder().cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        effect = (y_train - base(x.to(torch.bfloat16)).float()).abs().max()
    assert effect > 0.2
    assert (y_eval - y_train).abs().max() < 0.1 * effect
    fp32 = Encoder().cuda()
    ll.inject_adapter(fp32, "lora", ll.LoRAConfig(r=4, target_modules=["self_attn"]))
    _perturb(fp32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fp32(x)
    out.float()[..., 0].sum().backward()
    for name in ("lora_A", "lora_B", "lora_out_A", "lora_out_B"):
        grad = getattr(fp32.enc.self_attn, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
