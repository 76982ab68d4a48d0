"""LoRA under functorch transforms (``torch.func.grad``, ``vmap``): the layers take the reference
formula there, since the fused path's cast cache keys on storages that functorch's wrapped
parameters do not have. Gradients and outputs equal plain autograd's."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import lightning_lora as ll
from tests.conftest import build_tiny_bert, build_tiny_llama


def _models():
    return {"bert": lambda: build_tiny_bert(), "llama": lambda: build_tiny_llama()}


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_func_grad_equals_autograd(name: str) -> None:
    model = _models()[name]()
    targets = ["query", "key", "value", "dense"] if name == "bert" else ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=targets)  # q/k/v (gate/up) fuse as siblings
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at init would give A no gradient to compare
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    out_of = (lambda o: o.last_hidden_state) if name == "bert" else (lambda o: o.logits)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(pr: dict[str, torch.Tensor]) -> torch.Tensor:
        return out_of(functional_call(model, pr, (ids,))).pow(2).mean()

    g = grad(loss)(params)
    out_of(model(ids)).pow(2).mean().backward()
    assert len(g) == len(params) > 0
    for n, p in model.named_parameters():
        if p.requires_grad:  # (BERT's pooler is off the loss's path: autograd None, func.grad zeros)
            expected = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(g[n], expected, rtol=1e-5, atol=1e-6, msg=n)


def test_vmap_over_inputs_equals_loop() -> None:
    model = build_tiny_bert()
    # transformers 4.x's padding check (no mask given) calls .item() on the ids, which vmap refuses; it is
    # skipped when the config has no pad token. (The embedding's padding_idx was fixed at construction.)
    model.config.pad_token_id = None
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["query", "key", "value"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 50, (3, 1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = vmap(lambda i: model(i).last_hidden_state)(ids)
        looped = torch.stack([model(i).last_hidden_state for i in ids])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
