"""What the fused LoRA path keeps for backward: less than PEFT, with the same results.

The adapter's backward needs its input ``x`` (``grad_A = g_s^T x``), which a frozen base layer does
not keep. Where the autograd graph already keeps what ``x`` is made of (an MLP's ``act(gate) * up``,
a LLaMA RMSNorm's ``w * (h * rsqrt(var)).to(bf16)``), the fused path replays those elementwise ops
in backward instead of saving ``x`` (``lora._input_recipe``): the same bits, one activation less.
Saved bytes are read off the autograd graph (saved-tensor hooks would switch the replay off).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods import lora as lora_mod


def _weight_copies(model: nn.Module) -> dict[int, int]:
    """Storage -> bytes of the adapter-weight copies our layers cache between optimizer steps: the
    activation-dtype casts of fp32 A and B, and sibling sets' stacked ``[A_1; ...; A_k]``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies = [t for m in model.modules() for t in getattr(m, "_casts", ())]
    for m in model.modules():
        group = getattr(m, "_siblings", None)
        for s in (group.sets or {}).values() if group is not None else ():
            if s._a_cat is not None:
                copies.append(s._a_cat[1])
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in copies
            if t.untyped_storage().data_ptr() not in params}


def _held_bytes(model: nn.Module, loss: torch.Tensor) -> int:
    """Bytes of the distinct storages the autograd graph of ``loss`` holds for backward (C++ nodes'
    ``_saved_*`` fields; custom Functions' ``saved_tensors`` and ctx tensor attributes), parameters,
    buffers and our cached adapter-weight copies (:func:`_weight_copies`) left out."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    skip |= set(_weight_copies(model))
    held: dict[int, int] = {}

    def add(v: object) -> None:
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            if st.data_ptr() not in skip:
                held[st.data_ptr()] = st.nbytes()
        elif isinstance(v, (tuple, list)):
            for e in v:
                add(e)

    todo, seen = [loss.grad_fn], {}
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # kept alive: a freed node object's id can be reused by the next one
        todo.extend(f for f, _ in node.next_functions)
        if hasattr(node, "saved_tensors"):
            add(list(node.saved_tensors))
            add(list(vars(node).values()))
        else:
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    add(getattr(node, attr))
    return sum(held.values())


def _llama(hidden=64, inter=160, layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=inter, vocab_size=100)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ours(adapter_dtype, replay_inputs="products", **kw):
    model = _llama(**kw)
    ll.inject_adapter(model, "lora", r=8, alpha=16, target_modules="all-linear", adapter_dtype=adapter_dtype,
                      replay_inputs=replay_inputs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return model


def _optimizer_holds(model: nn.Module) -> None:
    """One step of an optimizer holding the adapter, as in a training loop: only then are the casts
    (and sibling sets' stacked A) kept between forwards (lr 0: the weights stay as they are)."""
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0).step()


def _step(model, ids, hooks=False):
    """Loss, held bytes and adapter gradients of one forward + backward (``hooks``: inside identity
    saved-tensor hooks, which switch the input replay off: the path that saves ``x``)."""
    model.zero_grad(set_to_none=True)
    if hooks:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = model(input_ids=ids, labels=ids)
    else:
        out = model(input_ids=ids, labels=ids)
    held = _held_bytes(model, out.loss)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), held, grads


@pytest.mark.parametrize("replay", ["products", "all"])
@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_llama_step_holds_less_than_peft_bf16(adapter_dtype, replay):
    """On a 2-layer bf16 LLaMA with LoRA on every linear layer, our graph plus our cached weight copies
    hold less than PEFT's graph with bf16 adapters; the graph alone holds less by at least the
    down_proj inputs of both layers (``act(gate) * up``), and with ``"all"`` also by three RMSNorm
    outputs: the q/k/v and gate/up inputs of the second layer and the gate/up input of the first (the
    first layer's input norm reads the frozen embedding: no graph there, so that input is saved). Before the input replay both graphs held the
    very same bytes, and the copies made ours larger."""
    peft = pytest.importorskip("peft")
    hidden, inter, batch, seq = 64, 160, 2, 48
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(1))
    ours = _ours(adapter_dtype, replay, hidden=hidden, inter=inter)
    _step(ours, ids)  # first pass: the sibling sets are learned
    _optimizer_holds(ours)
    _, ours_held, _ = _step(ours, ids)
    copies = sum(_weight_copies(ours).values())
    assert copies > 0  # fp32: the bf16 casts; bf16: the stacked A of each sibling set
    theirs = peft.get_peft_model(_llama(hidden=hidden, inter=inter),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
                                 autocast_adapter_dtype=False)
    out = theirs(input_ids=ids, labels=ids)
    peft_held = _held_bytes(theirs, out.loss)
    n_tok, bf16 = batch * seq, 2
    replayed = 2 * n_tok * inter * bf16 + (3 * n_tok * hidden * bf16 if replay == "all" else 0)
    assert ours_held + copies < peft_held, (ours_held, copies, peft_held)
    assert ours_held <= peft_held - replayed, (ours_held, peft_held, replayed)


def test_replay_off_saves_the_inputs_like_peft():
    """``replay_inputs="none"`` (or ``False``): the graph holds what PEFT's bf16 graph holds (every adapter
    input saved); ``"products"`` holds less by exactly the down_proj inputs, ``"all"`` (or ``True``) by
    three RMSNorm outputs more; outputs and gradients are the same bits in all four."""
    peft = pytest.importorskip("peft")
    hidden, inter, batch, seq = 64, 160, 2, 24
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(1))
    runs = {}
    for replay in ("all", "products", "none", True, False):
        model = _ours("bfloat16", replay_inputs=replay, hidden=hidden, inter=inter)
        _step(model, ids)
        _optimizer_holds(model)
        runs[replay] = _step(model, ids)
    theirs = peft.get_peft_model(_llama(hidden=hidden, inter=inter),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
                                 autocast_adapter_dtype=False)
    out = theirs(input_ids=ids, labels=ids)
    peft_held = _held_bytes(theirs, out.loss)
    assert abs(runs["none"][1] - peft_held) <= 1024, (runs["none"][1], peft_held)  # PEFT keeps a few scalars more
    n_tok, bf16 = batch * seq, 2
    assert runs["none"][1] - runs["products"][1] == 2 * n_tok * inter * bf16
    # RMSNorm outputs: both of layer 2 and layer 1's post-attention one (layer 1's input norm reads
    # the frozen embedding: no graph, nothing to replay from)
    assert runs["products"][1] - runs["all"][1] == 3 * n_tok * hidden * bf16
    assert runs[True][1] == runs["all"][1] and runs[False][1] == runs["none"][1]
    for mode in ("all", "products", True, False):
        assert torch.equal(runs[mode][0], runs["none"][0])
        assert runs[mode][2].keys() == runs["none"][2].keys()
        assert all(torch.equal(runs[mode][2][n], runs["none"][2][n]) for n in runs[mode][2])


@pytest.mark.parametrize("mode", ["products", "all"])
@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_replayed_input_gives_the_same_bits(adapter_dtype, mode):
    """Outputs and every adapter gradient with the input replayed equal, bit for bit, those of the
    path that saves the input (forced by saved-tensor hooks), over three AdamW steps."""
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    replay, saving = _ours(adapter_dtype, mode), _ours(adapter_dtype, mode)
    saving.load_state_dict(replay.state_dict())
    opts = [torch.optim.AdamW(ll.trainable_parameters(m), lr=1e-2) for m in (replay, saving)]
    for m in (replay, saving):  # the sibling plan is learned outside saved-tensor hooks only: two passes
        for _ in range(2):
            _step(m, ids)
    for _ in range(3):
        y, held, grads = _step(replay, ids)
        y_ref, held_ref, grads_ref = _step(saving, ids, hooks=True)
        assert held < held_ref
        assert torch.equal(y, y_ref)
        assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
        for name in grads:
            assert torch.equal(grads[name], grads_ref[name]), name
        for opt in opts:
            opt.step()


def test_recipe_covers_mul_and_cast_chains_only():
    """What the replay accepts: an out-of-place product whose factors are saved (directly or through
    a cast of such a product), GELU / SiLU of a saved input; not views, in-place results, leaves or
    other ops."""
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8)
    for casts in (True, False):
        assert lora_mod._input_recipe(torch.nn.functional.silu(a) * b, casts) is not None
    rms = w.bfloat16() * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True))).bfloat16()
    recipe = lora_mod._input_recipe(rms)
    replayed = lora_mod._replay(recipe)
    assert recipe is not None and replayed.dtype == torch.bfloat16 and torch.equal(replayed, rms)
    assert lora_mod._input_recipe(rms, casts=False) is None  # "products": no chain through a cast
    for act in (torch.nn.functional.silu, torch.nn.functional.gelu, lambda t: torch.nn.functional.gelu(t, approximate="tanh")):
        y = act(a.bfloat16())
        for casts in (True, False):  # activation(cast(leaf)): the activation's saved input, no cast replayed
            recipe = lora_mod._input_recipe(y, casts)
            assert recipe is not None and torch.equal(lora_mod._replay(recipe), y)
    assert lora_mod._input_recipe(w * b.exp()) is None  # exp's output: not a mul / cast / activation
    assert lora_mod._input_recipe((a * b)[:, :4]) is None  # a view
    y = a * b
    y.mul_(2)
    assert lora_mod._input_recipe(y) is None  # modified in place
    assert lora_mod._input_recipe(a) is None  # a leaf
    assert lora_mod._input_recipe(a + b) is None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert lora_mod._input_recipe(a * b) is None  # hooks own the saved tensors (checkpointing)


def test_down_projection_input_not_saved_and_gradients_match_reference():
    """One fused layer reading ``silu(g) * u``: it keeps only its rank-r intermediate, and its output
    and gradients equal the plain formula's (fp64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16)).double()
    layer = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["0"], adapter_dtype="float64")["0"]
    nn.init.normal_(layer.lora_B, std=0.1)
    g = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)
    u = torch.randn(10, 24, dtype=torch.float64, requires_grad=True)

    def run(fn):
        layer.zero_grad(set_to_none=True)
        g.grad = u.grad = None
        x = torch.nn.functional.silu(g) * u
        before = _held_bytes(model, x.sum())  # silu's g, the product's silu(g) and u
        y = fn(x)
        held = _held_bytes(model, y.sum()) - before
        (y * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        return y.detach(), held, [t.grad.clone() for t in (g, u, layer.lora_A, layer.lora_B)]

    y, held, grads = run(layer)
    y_ref, _, grads_ref = run(layer.reference_forward)
    assert held == 10 * 4 * 8  # s·x A^T only: x is replayed from silu(g) and u
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_replay_inputs_values():
    """The three modes, the session-6 booleans, and a clear error for anything else."""
    assert ll.LoRAConfig().replay_inputs == "products"
    assert ll.LoRAConfig(replay_inputs=True).replay_inputs == "all"
    assert ll.LoRAConfig(replay_inputs=False).replay_inputs == "none"
    with pytest.raises(ValueError, match="replay_inputs must be one of none, products, all"):
        ll.LoRAConfig(replay_inputs="some")
