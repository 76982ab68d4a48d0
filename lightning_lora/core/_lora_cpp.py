"""A C++ fast path for the fused LoRA autograd functions (host time on launch-bound steps).

``lightning_lora.methods.lora._FusedLoRA`` and ``_FusedLoRASiblings`` are Python
``torch.autograd.Function`` s: every adapted layer enters Python for its forward and again, from the
autograd engine, for its backward. On a launch-bound GPU step (BERT-base at 32 × 512 on the H200)
the GPU waits for that Python. This module holds a C++ ``torch::autograd::Function`` of each that
runs the very same ATen calls in the same order (outputs and gradients equal bit for bit; the tests
in ``tests/lightning_lora/test_lora_cpp_path.py`` compare them), compiled with
``torch.utils.cpp_extension.load_inline`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``).

``LIGHTNING_LORA_CPP`` chooses:

- unset or ``auto`` (the default, :func:`resolve_auto`): on for CUDA training where a C++ compiler
  and ninja exist. The first fused training forward (gradients enabled) on a CUDA input loads an
  earlier run's build at once, or starts a background process that builds it (about a minute) while
  training goes on through the Python functions, and switches to it when it is done. No compiler:
  the Python path, silently (an INFO log record). CPU inputs and inference (no gradients) never
  start anything.
- ``1``: on, built at the first fused forward, waiting for it (one WARNING line before a fresh build,
  one after, one warning where it fails); :func:`enable` (``lightning_lora.enable_cpp_path``) the
  same at once.
- ``0``: off; :func:`disable` (``lightning_lora.disable_cpp_path``) the same at run time.

:func:`status` (``lightning_lora.cpp_path_status``) says which. What it covers: the common
path only (no active dropout, input replay through products and activations but not dtype casts,
sibling sets whose members all have a bias or all have none); everything else, functorch
transforms and ``torch.compile`` included, takes the Python functions as before. So do inputs that
are tensor subclasses (their ``__torch_function__`` sees the Python function's ops) and inputs whose
replay would read a saved tensor written in place since it was saved (the Python path raises in
backward, not in forward). Tensors packed by a saved-tensor hook are never replayed from, on either
path (``lora._recipe``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import torch

log = logging.getLogger(__name__)

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <mutex>
#include <unordered_map>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

namespace {

// 0-dim placeholders for addmm's unused input (beta = 0): one per (dtype, device), never freed
Tensor placeholder(const Tensor& a) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<int64_t, Tensor>();
  const auto dev = a.device();
  const int64_t key = (static_cast<int64_t>(a.scalar_type()) << 32) |
      (static_cast<int64_t>(dev.type()) << 16) | static_cast<int64_t>(dev.index() + 1);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  Tensor z;
  {
    at::NoGradGuard ng;
    z = at::empty({}, a.options());
  }
  cache->emplace(key, z);
  return z;
}

// _mm_scaled: scaling * (a @ b) in one GEMM
Tensor mm_scaled(const Tensor& a, const Tensor& b, double s) {
  if (s == 1.0) return at::mm(a, b);
  return at::addmm(placeholder(a), a, b, /*beta=*/0, /*alpha=*/s);
}

// _mm_to: a @ b in dtype, fp32 accumulation straight from bf16/fp16 where the backend supports out_dtype
std::atomic<bool> mm_out_dtype_ok[static_cast<int>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)];
std::once_flag mm_out_dtype_init;

Tensor mm_to(const Tensor& a, const Tensor& b, at::ScalarType dtype) {
  std::call_once(mm_out_dtype_init, [] {
    for (auto& f : mm_out_dtype_ok) f.store(true);
  });
  const auto dt = a.scalar_type();
  const int dev = static_cast<int>(a.device().type());
  if (dtype == at::kFloat && (dt == at::kBFloat16 || dt == at::kHalf) && mm_out_dtype_ok[dev].load()) {
    try {
      return at::mm(a, b, dtype);
    } catch (const c10::Error&) {
      mm_out_dtype_ok[dev].store(false);
    }
  }
  return at::mm(a, b);
}

// the input replay of _input_recipe: a postfix program over saved tensors
// 0 push the next tensor, 1 mul, 2 silu, 3 gelu, 4 gelu(tanh)
Tensor replay(const variable_list& ts, size_t first, const std::vector<int64_t>& prog) {
  std::vector<Tensor> stack;
  size_t next = first;
  for (int64_t op : prog) {
    if (op == 0) {
      TORCH_CHECK(ts[next].defined(), "LoRA: a tensor its input is recomputed from was freed");
      stack.push_back(ts[next++]);
    } else if (op == 1) {
      Tensor b = stack.back(); stack.pop_back();
      Tensor a = stack.back(); stack.pop_back();
      stack.push_back(at::mul(a, b));
    } else if (op == 2) {
      stack.back() = at::silu(stack.back());
    } else {
      stack.back() = at::gelu(stack.back(), op == 3 ? "none" : "tanh");
    }
  }
  return stack.back();
}

// "[2, 5, 16]" built from plain values: streaming an IntArrayRef or Tensor::toString() into a
// TORCH_CHECK message crashed the process (SIGSEGV, torch 2.11 + g++ 13, session 22) instead of raising
std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

Tensor saved_input(const variable_list& ts, size_t first, const std::vector<int64_t>& prog,
                   at::IntArrayRef shape) {
  Tensor full = replay(ts, first, prog);
  if (full.sizes() != shape) {
    const std::string msg = "LoRA: the replayed input has shape " + shape_str(full.sizes()) + ", expected " +
        shape_str(shape);
    TORCH_CHECK(false, msg);
  }
  return full.reshape({-1, shape.back()});
}

void raise_modified(const Tensor& t, int64_t expected, const std::string& what) {
  // the tensor described from plain values (see shape_str)
  const std::string sizes = shape_str(t.sizes());
  // Python's t.type(): torch.FloatTensor, torch.cuda.BFloat16Tensor, ...
  const std::string kind = std::string("torch.") + (t.is_cuda() ? "cuda." : "") + c10::toString(t.scalar_type()) +
      "Tensor";
  const std::string msg = "one of the variables needed for gradient computation has been modified by an inplace "
      "operation: [" + kind + " " + sizes + "], " + what + ", is at version " + std::to_string(t._version()) +
      "; expected version " + std::to_string(expected) + " instead. Hint: enable anomaly detection to find the "
      "operation that failed to compute its gradient, with torch.autograd.set_detect_anomaly(True).";
  TORCH_CHECK(false, msg);  // word for word the Python path's _raise_modified
}

int64_t version_or(const Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

// @once_differentiable: under create_graph the results raise when differentiated again
variable_list once_differentiable(variable_list outs, bool grad_mode, const variable_list& grads) {
  if (!grad_mode) return outs;
  bool any = false;
  for (const auto& g : grads) any = any || (g.defined() && g.requires_grad());
  if (!any) return outs;
  variable_list fake;
  fake.reserve(outs.size());
  for (auto& o : outs) {
    if (o.defined()) {
      Tensor d = o.detach();
      d.set_requires_grad(true);
      fake.push_back(d);
    } else {
      fake.emplace_back();
    }
  }
  torch::autograd::DelayedError err(
      "trying to differentiate twice a function that was marked with @once_differentiable",
      static_cast<int64_t>(fake.size()));
  return err.apply(std::move(fake));
}

// ------------------------------------------------------------------------------------------------
// _FusedLoRA with xd = x (no active dropout)
struct FusedLoRA : public torch::autograd::Function<FusedLoRA> {
  // meta: [fifo, need_A, idx_x, idx_bias (-1: none), idx_A, idx_B, n_replay]
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                        const Tensor& A, const Tensor& B, const Tensor& Ac, const Tensor& Bc, double s,
                        std::vector<int64_t> meta, at::TensorList replay_ts, std::vector<int64_t> prog) {
    const auto shape = x.sizes();
    const int64_t n = shape.back();
    Tensor x2 = x.reshape({-1, n});
    Tensor xa_s = mm_scaled(x2, Ac.t(), s);  // (N, r)
    const int64_t m = Bc.size(0);
    std::vector<int64_t> oshape(shape.begin(), shape.end() - 1);
    oshape.push_back(m);
    Tensor out = at::empty(oshape, xa_s.options());
    Tensor out2 = out.view({-1, m});
    if (bias.has_value() && bias->defined()) {
      at::addmm_out(out2, *bias, xa_s, Bc.t());
    } else {
      at::mm_out(out2, xa_s, Bc.t());
    }
    out2.addmm_(x2, meta[0] ? w : w.t());
    const bool replaying = !prog.empty();
    const bool keep_xd = meta[1] && !replaying;
    variable_list saved{keep_xd ? x2 : Tensor(), xa_s,
                        Ac.scalar_type() == A.scalar_type() ? Ac : Tensor(),
                        Bc.scalar_type() == B.scalar_type() ? Bc : Tensor()};
    for (const auto& t : replay_ts) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->saved_data["w"] = w;
    ctx->saved_data["Ac"] = Ac;
    ctx->saved_data["Bc"] = Bc;
    ctx->saved_data["s"] = s;
    std::vector<int64_t> info(meta.begin(), meta.end());
    info.push_back(version_or(w));
    info.push_back(static_cast<int64_t>(A.scalar_type()));
    info.push_back(static_cast<int64_t>(B.scalar_type()));
    ctx->saved_data["i"] = info;
    ctx->saved_data["shape"] = shape.vec();
    if (replaying) ctx->saved_data["p"] = prog;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool grad_mode = at::GradMode::is_enabled();
    variable_list result;
    {
      at::NoGradGuard ng;
      auto saved = ctx->get_saved_variables();  // checks the aliases' versions
      auto info = ctx->saved_data["i"].toIntVector();
      // info: fifo, need_A_fwd, idx_x, idx_bias, idx_A, idx_B, n_replay, w_version, dtA, dtB
      Tensor w = ctx->saved_data["w"].toTensor();
      if (info[7] >= 0 && static_cast<int64_t>(w._version()) != info[7]) {
        raise_modified(w, info[7], "the base weight of a fused LoRA layer");
      }
      Tensor Ac = ctx->saved_data["Ac"].toTensor();
      Tensor Bc = ctx->saved_data["Bc"].toTensor();
      const double s = ctx->saved_data["s"].toDouble();
      auto shape = ctx->saved_data["shape"].toIntVector();
      const bool need_x = ctx->needs_input_grad(info[2]);
      const bool need_bias = info[3] >= 0 && ctx->needs_input_grad(info[3]);
      const bool need_A = ctx->needs_input_grad(info[4]);
      const bool need_B = ctx->needs_input_grad(info[5]);
      Tensor g = grads[0].reshape({-1, Bc.size(0)});
      Tensor gb_s = mm_scaled(g, Bc, s);  // (N, r) = s g B
      Tensor w_b = info[0] ? w.t() : w;
      Tensor grad_x, grad_bias, grad_A, grad_B;
      if (need_x) {
        grad_x = at::mm(gb_s, Ac);
        grad_x.addmm_(g, w_b);
        grad_x = grad_x.view(shape);
      }
      if (need_A) {
        Tensor xd = saved[0];
        if (info[6] > 0) {
          xd = saved_input(saved, 4, ctx->saved_data["p"].toIntVector(), shape);
        }
        grad_A = mm_to(gb_s.t(), xd, static_cast<at::ScalarType>(info[8]));
      }
      if (need_B) grad_B = mm_to(g.t(), saved[1], static_cast<at::ScalarType>(info[9]));
      if (need_bias) grad_bias = g.sum(0);
      // one entry per forward argument (x, w, bias, A, B, Ac, Bc, s, meta, replay tensors..., prog)
      result.resize(10 + info[6]);
      result[0] = grad_x;
      result[2] = grad_bias;
      result[3] = grad_A;
      result[4] = grad_B;
    }
    return once_differentiable(std::move(result), grad_mode, grads);
  }
};

Tensor fused(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& A,
             const Tensor& B, const Tensor& Ac, const Tensor& Bc, double s, bool fifo,
             std::vector<Tensor> replay_ts, std::vector<int64_t> prog) {
  const bool has_bias = bias.has_value() && bias->defined();
  const bool grad = at::GradMode::is_enabled();
  // edge indices among the tensor inputs (an absent bias is no input)
  const int64_t idx_bias = has_bias ? 2 : -1;
  const int64_t idx_A = has_bias ? 3 : 2;
  std::vector<int64_t> meta{fifo ? 1 : 0, (grad && A.requires_grad()) ? 1 : 0, 0, idx_bias, idx_A, idx_A + 1,
                            static_cast<int64_t>(replay_ts.size())};
  return FusedLoRA::apply(x, w, bias, A, B, Ac, Bc, s, std::move(meta), at::TensorList(replay_ts), std::move(prog));
}

// ------------------------------------------------------------------------------------------------
// _FusedLoRASiblings: k layers reading the same x. Tensor inputs in order: x, a_cat, ws (k),
// biases (k or 0), As (k), Bs (k), b_casts (k), replay tensors
struct FusedLoRASiblings : public torch::autograd::Function<FusedLoRASiblings> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& a_cat, at::TensorList ws,
                               at::TensorList biases, at::TensorList As, at::TensorList Bs, at::TensorList b_casts,
                               double s, std::vector<int64_t> ranks, std::vector<int64_t> fifo,
                               at::TensorList replay_ts, std::vector<int64_t> prog) {
    const size_t k = ranks.size();
    const bool has_bias = !biases.empty();
    const auto shape = x.sizes();
    Tensor x2 = x.reshape({-1, shape.back()});
    Tensor xa_s = mm_scaled(x2, a_cat.t(), s);  // (N, R)
    auto xas = xa_s.split_with_sizes(ranks, 1);
    std::vector<int64_t> oshape(shape.begin(), shape.end() - 1);
    oshape.push_back(0);
    variable_list outs;
    outs.reserve(k);
    for (size_t i = 0; i < k; ++i) {
      const int64_t m = b_casts[i].size(0);
      oshape.back() = m;
      Tensor out = at::empty(oshape, xa_s.options());
      Tensor out2 = out.view({-1, m});
      Tensor bc_t = b_casts[i].t();
      if (has_bias) {
        at::addmm_out(out2, biases[i], xas[i], bc_t);
      } else {
        at::mm_out(out2, xas[i], bc_t);
      }
      out2.addmm_(x2, fifo[i] ? ws[i] : ws[i].t());
      outs.push_back(out);
    }
    const bool replaying = !prog.empty();
    variable_list saved{replaying ? Tensor() : x2, xa_s};
    for (size_t i = 0; i < k; ++i) {
      saved.push_back(b_casts[i].scalar_type() == Bs[i].scalar_type() ? b_casts[i] : Tensor());
    }
    for (const auto& t : replay_ts) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // an unused sibling's gradient arrives undefined, not zeros
    std::vector<Tensor> kept{a_cat};
    std::vector<int64_t> versions{version_or(a_cat)};
    for (const auto& w : ws) {
      kept.push_back(w);
      versions.push_back(version_or(w));
    }
    ctx->saved_data["kept"] = kept;
    ctx->saved_data["bc"] = b_casts.vec();
    ctx->saved_data["s"] = s;
    ctx->saved_data["ranks"] = ranks;
    ctx->saved_data["fifo"] = fifo;
    ctx->saved_data["v"] = versions;
    std::vector<int64_t> dts;  // A dtypes then B dtypes, n_replay, has_bias
    for (const auto& a : As) dts.push_back(static_cast<int64_t>(a.scalar_type()));
    for (const auto& b : Bs) dts.push_back(static_cast<int64_t>(b.scalar_type()));
    dts.push_back(static_cast<int64_t>(replay_ts.size()));
    dts.push_back(has_bias ? 1 : 0);
    ctx->saved_data["dt"] = dts;
    ctx->saved_data["shape"] = shape.vec();
    if (replaying) ctx->saved_data["p"] = prog;
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gs_in) {
    const bool grad_mode = at::GradMode::is_enabled();
    variable_list result;
    {
      at::NoGradGuard ng;
      auto saved = ctx->get_saved_variables();  // checks the B aliases' versions
      auto kept = ctx->saved_data["kept"].toTensorVector();
      auto versions = ctx->saved_data["v"].toIntVector();
      for (size_t i = 0; i < kept.size(); ++i) {
        if (versions[i] >= 0 && static_cast<int64_t>(kept[i]._version()) != versions[i]) {
          raise_modified(kept[i], versions[i], i == 0 ? std::string("the stacked A casts of a fused LoRA sibling set")
                                                       : "the base weight of member " + std::to_string(i - 1) +
                                                             " of a fused LoRA sibling set");
        }
      }
      Tensor a_cat = kept[0];
      auto b_casts = ctx->saved_data["bc"].toTensorVector();
      const double s = ctx->saved_data["s"].toDouble();
      auto ranks = ctx->saved_data["ranks"].toIntVector();
      auto fifo = ctx->saved_data["fifo"].toIntVector();
      auto dts = ctx->saved_data["dt"].toIntVector();
      auto shape = ctx->saved_data["shape"].toIntVector();
      const size_t k = ranks.size();
      const int64_t n_replay = dts[2 * k];
      const bool has_bias = dts[2 * k + 1] != 0;
      // tensor input indices: x 0, a_cat 1, ws 2.., biases, As, Bs, b_casts
      const size_t i_bias = 2 + k, i_A = i_bias + (has_bias ? k : 0), i_B = i_A + k;
      const bool need_x = ctx->needs_input_grad(0);
      std::vector<bool> need_A(k), need_B(k), need_bias(k);
      bool any_A = false;
      for (size_t i = 0; i < k; ++i) {
        need_A[i] = ctx->needs_input_grad(i_A + i);
        any_A = any_A || need_A[i];
        need_B[i] = ctx->needs_input_grad(i_B + i);
        need_bias[i] = has_bias && ctx->needs_input_grad(i_bias + i);
      }
      Tensor xa_s = saved[1];
      std::vector<Tensor> gs(k), g_ts(k);
      for (size_t i = 0; i < k; ++i) {
        if (gs_in[i].defined()) {
          gs[i] = gs_in[i].reshape({-1, b_casts[i].size(0)});
          g_ts[i] = gs[i].t();
        }
      }
      int64_t R = 0;
      for (auto r : ranks) R += r;
      Tensor gb_t = at::empty({R, xa_s.size(0)}, xa_s.options());  // (R, N)
      auto rows = gb_t.split_with_sizes(ranks);
      for (size_t i = 0; i < k; ++i) {
        if (!g_ts[i].defined()) {
          rows[i].zero_();
        } else if (s == 1.0) {
          at::mm_out(rows[i], b_casts[i].t(), g_ts[i]);
        } else {
          at::addmm_out(rows[i], rows[i], b_casts[i].t(), g_ts[i], /*beta=*/0, /*alpha=*/s);
        }
      }
      // one entry per forward argument: x, a_cat, ws, biases, As, Bs, b_casts (TensorLists flattened),
      // s, ranks, fifo, replay tensors, prog
      const size_t nb = has_bias ? k : 0;
      result.resize(2 + k + nb + 3 * k + 3 + n_replay + 1);
      if (need_x) {
        Tensor grad_x = at::mm(gb_t.t(), a_cat);
        for (size_t i = 0; i < k; ++i) {
          if (gs[i].defined()) grad_x.addmm_(gs[i], fifo[i] ? kept[1 + i].t() : kept[1 + i]);
        }
        result[0] = grad_x.view(shape);
      }
      if (any_A) {
        Tensor x = saved[0];
        if (n_replay > 0) x = saved_input(saved, 2 + k, ctx->saved_data["p"].toIntVector(), shape);
        Tensor grad_a_cat = mm_to(gb_t, x, static_cast<at::ScalarType>(dts[0]));  // (R, n)
        auto parts = grad_a_cat.split_with_sizes(ranks);
        for (size_t i = 0; i < k; ++i) {
          if (gs[i].defined()) result[2 + k + nb + i] = parts[i];
        }
      }
      auto xas = xa_s.split_with_sizes(ranks, 1);
      for (size_t i = 0; i < k; ++i) {
        if (gs[i].defined() && need_B[i]) {
          result[2 + k + nb + k + i] = mm_to(g_ts[i], xas[i], static_cast<at::ScalarType>(dts[k + i]));
        }
        if (gs[i].defined() && need_bias[i]) result[2 + k + i] = gs[i].sum(0);
      }
    }
    return once_differentiable(std::move(result), grad_mode, gs_in);
  }
};

variable_list siblings(const Tensor& x, const Tensor& a_cat, std::vector<Tensor> ws, std::vector<Tensor> biases,
                       std::vector<Tensor> As, std::vector<Tensor> Bs, std::vector<Tensor> b_casts, double s,
                       std::vector<int64_t> ranks, std::vector<int64_t> fifo, std::vector<Tensor> replay_ts,
                       std::vector<int64_t> prog) {
  return FusedLoRASiblings::apply(x, a_cat, at::TensorList(ws), at::TensorList(biases), at::TensorList(As),
                                  at::TensorList(Bs), at::TensorList(b_casts), s, std::move(ranks),
                                  std::move(fifo), at::TensorList(replay_ts), std::move(prog));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused", &fused, "fused LoRA (C++ autograd function)");
  m.def("siblings", &siblings, "fused LoRA sibling set (C++ autograd function)");
}
"""

_MODULE: Any = None
_FAILED = False


def _build_directory(name: str) -> str | None:
    """The folder ``load_inline`` builds ``name`` in (``TORCH_EXTENSIONS_DIR`` or torch's default
    cache, one subfolder per extension), created if missing; None where torch's private helper for
    it is gone or fails (the build then goes ahead, announced without a path)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(name, verbose=False)
    except Exception:  # a private helper of torch's: asking where must never cost the build
        return None


def _extension_name() -> str:
    """The extension's name: one per source and torch version (torch rebuilds a cached extension
    after an upgrade, in the same folder, which :func:`_is_built` would not see)."""
    return "lightning_lora_cpp_" + hashlib.sha1((CPP_SOURCE + torch.__version__).encode()).hexdigest()[:12]


def _is_built(build_dir: str | None, name: str) -> bool:
    """Whether ``name``'s library is already in ``build_dir`` (``load_inline`` then only reloads it)."""
    from torch.utils.cpp_extension import LIB_EXT

    return build_dir is not None and os.path.exists(os.path.join(build_dir, name + LIB_EXT))


def _build(quiet: bool = False) -> Any:
    """The compiled extension (compiled once per source into torch's extension cache), or None
    with one warning where it cannot be built (``quiet``: an INFO log record instead, for the
    automatic mode, which nobody asked for)."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED:
        return _MODULE
    try:
        from torch.utils.cpp_extension import load_inline

        name = _extension_name()
        build_dir = _build_directory(name)
        # Why: the first build compiles for about a minute with no output (load_inline is silent
        # unless verbose), which looks like a hang at the first forward. Announced at WARNING:
        # INFO records reach no handler in a process that configured no logging, and this line
        # is what explains the stall. A cached build (the library file already in the folder;
        # load_inline then only reloads it, ninja finding nothing to do) says nothing
        fresh = not _is_built(build_dir, name)
        if fresh:
            log.warning("lightning_lora: compiling the C++ LoRA path once (about a minute; later runs reuse "
                        "the build) into %s", build_dir or "torch's extension cache (TORCH_EXTENSIONS_DIR)")
            start = time.perf_counter()
        _MODULE = load_inline(name=name, cpp_sources=[CPP_SOURCE], extra_cflags=["-O2"], build_directory=build_dir,
                              verbose=os.environ.get("LIGHTNING_LORA_CPP_VERBOSE") == "1")
        if fresh:
            log.warning("lightning_lora: C++ LoRA path built in %.1f s", time.perf_counter() - start)
    except Exception as e:  # no compiler, no ninja, a failed build: the Python path runs
        _FAILED = True
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        if quiet:
            log.info("lightning_lora: the C++ LoRA fast path could not be loaded (%s); using the Python path", why)
        else:
            warnings.warn(f"lightning_lora: the C++ LoRA fast path could not be built ({why}); using the Python path",
                          RuntimeWarning, stacklevel=3)
        return None
    return _MODULE


def available() -> bool:
    """Whether the extension is (or can be) built here."""
    return _build() is not None


def enable() -> bool:
    """Turn the C++ path on (compiling it now if needed); False (and one warning) where it cannot be built."""
    from ..methods import lora

    mod = _build()
    lora._CPP = mod
    return mod is not None


def disable() -> None:
    """Turn the C++ path off: the Python functions run."""
    from ..methods import lora

    lora._CPP = None


def load_for_env() -> Any:
    """``LIGHTNING_LORA_CPP=1``: called at the first fused forward; the module or None."""
    from ..methods import lora

    lora._CPP = mod = _build()
    return mod


#: ``lora._CPP`` in the automatic mode (the default; ``LIGHTNING_LORA_CPP`` unset or ``auto``): see
#: :func:`resolve_auto`
AUTO = "auto"
#: the automatic mode's background build (a child process), once started
_BUILDER: subprocess.Popen[bytes] | None = None
#: ``time.monotonic()`` before which the running builder is not polled again
_NEXT_POLL = 0.0
_AUTO_LOCK = threading.Lock()
#: seconds after which a background build gives up (a stale lock of torch's, left by a killed build,
#: would otherwise keep the child waiting for ever)
BUILD_TIMEOUT_S = 900


def mode_from_env() -> Any:
    """``lora._CPP``'s initial value from ``LIGHTNING_LORA_CPP``: ``1`` (or true/yes/on) True (built at
    the first fused forward, waiting for the build), ``0`` (or false/no/off) None (off), unset, empty or
    ``auto`` :data:`AUTO`; anything else is refused, naming the variable."""
    value = os.environ.get("LIGHTNING_LORA_CPP", AUTO).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return None
    if value in (AUTO, ""):
        return AUTO
    # Why refuse: before the automatic mode any value but 1 meant off, so a typo was silent
    raise ValueError(f"LIGHTNING_LORA_CPP={os.environ['LIGHTNING_LORA_CPP']!r}: expected 1 (on), 0 (off) or auto")


def _toolchain() -> bool:
    """A C++ compiler (``$CXX``, else ``c++``) and ninja, as ``load_inline`` needs."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


def _set_mode(mod: Any) -> Any:
    """Leave the automatic mode for ``mod`` (the module: on; None: off) unless the user switched the
    path on or off meanwhile (:func:`enable`, :func:`disable`). Returns what ``lora._CPP`` now is, or
    None where that is not a module."""
    from ..methods import lora

    if lora._CPP is AUTO:
        lora._CPP = mod
    return lora._CPP if lora._CPP is not True and lora._CPP is not AUTO else None


def resolve_auto() -> Any:
    """The automatic mode at a fused forward that takes part (:func:`starts_auto`, checked by the
    caller): the compiled module where it is ready, else None (this forward takes the Python path).

    Only CUDA inputs in training (:func:`starts_auto`) start anything: the C++ path saves host time,
    which decides a step's time only where the GPU waits for the host (BERT-base at 32 x 512 on an
    H200: 0.71-0.76 of PEFT's step against the Python path's 0.85-0.88, docs/benchmarks.md); on the
    CPU the arithmetic usually dominates and a minute of a core's compiling is not worth it. On the
    first such forward:

    - an extension already built for this source and torch (an earlier run's) is loaded at once;
    - where there is no compiler or no ninja, the mode ends (off) with an INFO log record;
    - otherwise a child process builds it (about a minute, into torch's extension cache) while
      training goes on through the Python path; forwards poll the child at most once a second and
      load the build when it is done (bit-for-bit the same outputs and gradients: the switch is
      invisible but for the speed). A child, not a thread: a run that ends first leaves it to finish
      the build (the next run loads it) instead of killing it halfway, with torch's build lock held.
    """
    if _MODULE is not None or _FAILED:  # built (or failed) already: no waiting for the next poll
        return _set_mode(_MODULE)
    if _BUILDER is not None and time.monotonic() < _NEXT_POLL:  # (the common case while building: no lock)
        return None
    with _AUTO_LOCK:  # two threads' forwards must not start two builders
        return _resolve_auto_locked()


def starts_auto(x: Any) -> bool:
    """Whether a fused forward with input ``x`` takes part in the automatic mode: a CUDA input with
    gradients enabled (training). Inference (``torch.no_grad``, ``inference_mode``: ``lncrna predict``)
    starts nothing, so a short command leaves no build running behind it; once training has switched
    the path on, inference in that process uses it too."""
    return bool(x.is_cuda) and torch.is_grad_enabled()


def _resolve_auto_locked() -> Any:
    global _BUILDER, _NEXT_POLL
    if _MODULE is not None or _FAILED:
        return _set_mode(_MODULE)
    name = _extension_name()
    if _BUILDER is None:
        if not _toolchain():
            log.info("lightning_lora: no C++ compiler or ninja: the fused LoRA layers use the Python path "
                     "(LIGHTNING_LORA_CPP=0 says so without looking)")
            return _set_mode(None)
        if _is_built(_build_directory(name), name):
            return _set_mode(_build(quiet=True))
        try:
            _BUILDER = subprocess.Popen(
                [sys.executable, __file__, "--build"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)  # (a Ctrl-C of the run does not stop it halfway)
        except OSError as e:  # no usable interpreter to run (an embedded Python): nothing to wait for
            log.info("lightning_lora: could not start the background build of the C++ LoRA path (%s); using the "
                     "Python path", e)
            return _set_mode(None)
        log.info("lightning_lora: building the C++ LoRA path in the background (about a minute); the Python "
                 "path runs until it is ready")
        _NEXT_POLL = time.monotonic() + 1.0
        return None
    now = time.monotonic()
    if now < _NEXT_POLL:
        return None
    _NEXT_POLL = now + 1.0
    code = _BUILDER.poll()
    if code is None:
        return None
    # Why the second condition: a child that built for another torch (a sys.path changed in this process
    # only) leaves nothing under this process's name, and loading would then compile here, in the
    # foreground, for a minute: the stall the background build is for
    if code != 0 or not _is_built(_build_directory(name), name):
        log.info("lightning_lora: the background build of the C++ LoRA path failed (exit %s); using the Python "
                 "path (LIGHTNING_LORA_CPP=1 builds it in the foreground and shows why)", code)
        return _set_mode(None)
    mod = _build(quiet=True)
    if mod is not None:
        log.info("lightning_lora: C++ LoRA path built; the fused LoRA layers use it from now on")
    return _set_mode(mod)


def status() -> str:
    """Where the C++ path stands: ``"on"``, ``"off"``, ``"auto"`` (automatic, nothing started: no
    fused forward on a CUDA input yet), ``"building"`` (automatic, building in the background) or
    ``"pending"`` (``LIGHTNING_LORA_CPP=1``, built at the first fused forward). Asking also completes a
    finished background build, so a benchmark can wait for the steady state with
    ``while status() == "building": time.sleep(1)``."""
    from ..methods import lora

    cpp = lora._CPP
    if cpp is AUTO and (_BUILDER is not None or _MODULE is not None):
        # started (or loaded) already: the next CUDA training forward's state, decided now
        global _NEXT_POLL
        _NEXT_POLL = 0.0
        resolve_auto()
        cpp = lora._CPP
        return "building" if cpp is AUTO else "on" if cpp is not None else "off"
    if cpp is AUTO:
        return "auto"
    return "pending" if cpp is True else "on" if cpp is not None else "off"


#: recipe activation codes (see the C++ ``replay``)
_ACT = {None: 2, "none": 3, "tanh": 4}


def _encode(r: tuple[Any, ...], ts: list[torch.Tensor], prog: list[int]) -> bool:
    """Append recipe ``r``'s saved tensors to ``ts`` and its postfix program to ``prog``; False for an
    op the C++ replay does not know. A module-level function, not a closure that recurses through its
    own cell: such a closure is a reference cycle holding ``ts``, and so the replayed-from activations
    (a BERT MLP's GELU input, one per layer), until the cyclic garbage collector happens to run."""
    kind = r[0]
    if kind == "saved":
        node, attr = r[1], r[2]
        # The Python path reads this tensor in backward; here it is read now, in forward. One that
        # cannot be unpacked now (written in place since it was saved: autograd raises, in backward on
        # the Python path) keeps the Python path, which then behaves as it always did. (Tensors packed
        # by a saved-tensor hook never get here: lora._recipe does not replay from them.)
        try:
            t = getattr(node, attr)
        except RuntimeError:
            return False
        if t is None:
            return False
        ts.append(t)
        prog.append(0)
        return True
    if kind == "mul":
        if not (_encode(r[1], ts, prog) and _encode(r[2], ts, prog)):
            return False
        prog.append(1)
        return True
    if kind == "act" and r[2] in _ACT:
        if not _encode(r[1], ts, prog):
            return False
        prog.append(_ACT[r[2]])
        return True
    return False


def encode_recipe(recipe: tuple[Any, ...]) -> tuple[list[torch.Tensor], list[int]] | None:
    """An ``_input_recipe`` recipe as (saved tensors, postfix program) for the C++ replay, or None
    (a dtype cast or an unknown op: the Python path runs)."""
    ts: list[torch.Tensor] = []
    prog: list[int] = []
    return (ts, prog) if _encode(recipe, ts, prog) else None


if __name__ == "__main__" and sys.argv[1:] == ["--build"]:
    # the automatic mode's background build (resolve_auto): this file runs alone, without importing
    # lightning_lora (which the parent may have imported from a path this process does not have)
    import signal

    if hasattr(signal, "alarm"):  # (POSIX)
        signal.alarm(BUILD_TIMEOUT_S)
    sys.exit(0 if _build() is not None else 1)
