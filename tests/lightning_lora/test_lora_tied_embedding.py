"""LoRA's ``ensure_weight_tying``: an adapted embedding whose table is also the output head's weight
(GPT-2, SmolLM2) gives the head the same update (:class:`TiedLoRALinear`). The reference is the
model with ``E + ΔE`` written into the shared table by hand; gradients are checked against that
function built with autograd; merging writes ``ΔE`` once whatever the layer order; PEFT's
directories load both ways (PEFT ties only heads of embeddings named ``embed_tokens``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_modules import LoRAEmbedding, TiedLoRALinear
from tests.conftest import build_tiny_gpt2, randomize_adapter as _perturb, tiny_llama_config


class TiedLM(nn.Module):
    """Embedding (20 x 8) -> tanh(Linear) -> head tied to the embedding."""

    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        if head_first:  # the head registered before the embedding: merges must not depend on order
            self.lm_head = nn.Linear(8, 20, bias=False)
        self.wte = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        if not head_first:
            self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.body(self.wte(ids))))


IDS = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(1))


def _tied(head_first: bool = False, **kw) -> TiedLM:
    model = TiedLM(head_first)
    ll.inject_adapter(model, "lora", r=2, alpha=4, target_modules=["wte"], ensure_weight_tying=True, **kw)
    return model


def test_head_shares_the_embedding_adapter_and_has_no_parameters_of_its_own():
    base = TiedLM()
    model = _tied()
    assert isinstance(model.wte, LoRAEmbedding) and isinstance(model.lm_head, TiedLoRALinear)
    assert model.lm_head.tied_source is model.wte
    assert model.lm_head.base_layer.weight is model.wte.base_layer.weight
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"wte.lora_embedding_A", "wte.lora_embedding_B"}
    assert not list(model.lm_head.parameters(recurse=False))
    torch.testing.assert_close(model(IDS), base(IDS), atol=0, rtol=0)  # A = 0 at init


def test_output_and_gradients_are_those_of_the_adapted_table():
    model = _tied()
    _perturb(model)
    emb = model.wte
    out = model(IDS)
    out.pow(2).mean().backward()
    grads = {n: emb.get_parameter(n).grad.clone() for n in ("lora_embedding_A", "lora_embedding_B")}
    # the same function written out: one table E + ΔE in the lookup and in the head
    a = emb.lora_embedding_A.detach().clone().requires_grad_(True)
    b = emb.lora_embedding_B.detach().clone().requires_grad_(True)
    table = emb.base_layer.weight + emb.scaling * (b @ a).t()
    ref = F.linear(torch.tanh(model.body(F.embedding(IDS, table))), table)
    ref.pow(2).mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads["lora_embedding_A"], a.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads["lora_embedding_B"], b.grad, atol=1e-6, rtol=1e-4)
    # without the tie the head keeps the frozen table: another function
    untied = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll.inject_adapter(untied, "lora", r=2, alpha=4, target_modules=["wte"])
    untied.wte.load_state_dict(model.wte.state_dict())
    assert (untied(IDS) - out).abs().max() > 1e-3


@pytest.mark.parametrize("head_first", [False, True])
def test_merge_writes_the_update_once_in_any_layer_order(head_first):
    model = _tied(head_first)
    _perturb(model)
    expected = model(IDS).detach()
    table = model.wte.base_layer.weight.detach().clone()
    ll.merge_adapter(model)
    assert model.lm_head.merged and model.wte.merged
    torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=0)
    ll.unmerge_adapter(model)
    assert not model.lm_head.merged
    torch.testing.assert_close(model.wte.base_layer.weight, table, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=0)
    ll.unload(model, merge=True)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=0)


def test_disable_runs_the_base_and_save_load_round_trips(tmp_path):
    base = TiedLM()
    model = _tied()
    _perturb(model)
    with ll.disable_adapter(model):
        torch.testing.assert_close(model(IDS), base(IDS), atol=0, rtol=0)
    ll.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # PEFT's copies of the factors for the head, beside the embedding's own
    torch.testing.assert_close(saved["base_model.model.lm_head.lora_A.weight"], model.wte.lora_embedding_B.detach().t())
    loaded = TiedLM()
    ll.load_adapter(loaded, tmp_path)
    assert isinstance(loaded.lm_head, TiedLoRALinear)
    torch.testing.assert_close(loaded(IDS), model(IDS), atol=0, rtol=0)


def _tied_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    return LlamaForCausalLM(config).eval()


def test_peft_tied_directories_load_both_ways_with_the_same_outputs(tmp_path):
    import peft

    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tied_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                                    ensure_weight_tying=True))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = theirs(ids).logits.detach()
    ours = _tied_llama()
    ll.load_adapter(ours, tmp_path / "peft")
    assert isinstance(ours.lm_head, TiedLoRALinear)
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = _tied_llama()(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter acts, head included
    ll.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_tied_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=0)


def test_gpt2_head_follows_the_embedding_and_merges():
    base = build_tiny_gpt2()
    model = copy.deepcopy(base)
    layers = ll.inject_adapter(model, "lora", r=4, target_modules=["wte", "c_attn"], ensure_weight_tying=True)
    assert isinstance(layers["lm_head"], TiedLoRALinear)
    _perturb(model)
    ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = model(ids).logits.detach()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.transformer.wte.weight += model.transformer.wte.delta_weight().t()  # tied: the head too
        for name, layer in layers.items():
            if name.endswith("c_attn"):
                ref.get_submodule(name).weight += layer.delta_weight().t()
    torch.testing.assert_close(ref(ids).logits, expected, atol=1e-5, rtol=0)
    ll.merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_adapter_callback_merges_a_tied_embedding_at_fit_end(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TiedLM()

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]).flatten(0, 1), batch[0].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(ll.trainable_parameters(self), lr=0.05)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(IDS.repeat(4, 1)), batch_size=4)
    callback = ll.AdapterCallback("lora", r=2, target="net", target_modules=["wte"], ensure_weight_tying=True,
                                  merge_on_fit_end=True, export_dir=tmp_path / "a")
    module = Module()
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    trainer.fit(module, loader)
    net = module.net
    assert net.wte.merged and net.lm_head.merged
    loaded = TiedLM()
    ll.load_adapter(loaded, tmp_path / "a")
    torch.testing.assert_close(loaded(IDS), net(IDS), atol=1e-5, rtol=0)


# ---- refusals --------------------------------------------------------------------------------
def test_refusals_leave_the_model_as_it_was():
    with pytest.raises(ValueError, match="ensure_weight_tying does not support DoRA"):
        ll.LoRAConfig(r=2, use_dora=True, ensure_weight_tying=True)
    model = TiedLM()
    with pytest.raises(ValueError, match="'lm_head' \\(Linear\\) shares its weight with 'wte'; target the embedding only"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["wte", "lm_head"], ensure_weight_tying=True)
    assert not ll.adapter_layers(model) and ll.get_adapter_method(model) is None
    assert not any(p.requires_grad is False for p in model.parameters())  # requires_grad restored
    with pytest.raises(ValueError, match="target the embedding only"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["lm_head"], ensure_weight_tying=True)
    frozen_head = nn.ModuleDict({"wte": nn.Embedding(20, 8), "conv": nn.Conv1d(8, 20, 1)})
    with torch.no_grad():  # a non-Linear module holding the table cannot take the head's update
        frozen_head["conv"].weight = nn.Parameter(torch.zeros(20, 8, 1))
    frozen_head["conv"].weight = frozen_head["wte"].weight  # (shape differs: only identity matters for ties)
    with pytest.raises(ValueError, match="only an untargeted nn.Linear head"):
        ll.inject_adapter(frozen_head, "lora", r=2, target_modules=["wte"], ensure_weight_tying=True)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    with pytest.warns(UserWarning, match="no adapted nn.Embedding is tied"):
        ll.inject_adapter(nn.Sequential(nn.Embedding(5, 4)), "lora", r=2, target_modules=["0"], ensure_weight_tying=True)
    with pytest.raises(ValueError, match="named adapters do not support ensure_weight_tying"):
        ll.add_adapter(TiedLM(), "a", "lora", ll.LoRAConfig(r=2, target_modules=["wte"], ensure_weight_tying=True))
    tied = _tied()
    with pytest.raises(TypeError, match="layer 'lm_head' \\(nn.Linear\\) is one that named adapters do not support"):
        ll.add_adapter(tied, "b", "lora", ll.LoRAConfig(r=2, target_modules=["body"]))
    assert isinstance(tied.lm_head, TiedLoRALinear) and type(tied.body) is nn.Linear


@pytest.mark.gpu
def test_cuda_bf16_autocast_training_and_merge():
    model = _tied().cuda()
    _perturb(model, std=0.1)
    ids = IDS.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids)
    out.float().pow(2).mean().backward()
    for p in (model.wte.lora_embedding_A, model.wte.lora_embedding_B):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(ids)
        ll.merge_adapter(model)
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)
