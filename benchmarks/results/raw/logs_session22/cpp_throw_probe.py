"""Does an exception thrown from a C++ torch::autograd::Function's backward segfault on this toolchain?"""
import faulthandler, sys, torch
from torch.utils.cpp_extension import load_inline
faulthandler.enable()
src = r"""
#include <torch/extension.h>
using namespace torch::autograd;
struct Boom : public Function<Boom> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, int64_t mode) {
    ctx->saved_data["m"] = mode; TORCH_CHECK(mode != 4, "thrown in forward"); return x * 2; }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto m = ctx->saved_data["m"].toInt();
    if (m == 1) TORCH_CHECK(false, "plain message");
    if (m == 2) { torch::Tensor t = torch::ones({2}); TORCH_CHECK(false, "with tensor ", t.toString(), " ", t.sizes(), " v", t._version()); }
    if (m == 3) { { at::NoGradGuard ng; TORCH_CHECK(false, "inside NoGradGuard"); } }
    if (m == 5) throw std::runtime_error("std::runtime_error");
    return {g[0] * 2, torch::Tensor()}; }
};
torch::Tensor boom(torch::Tensor x, int64_t mode) { return Boom::apply(x, mode); }
"""
mod = load_inline("boom_probe", cpp_sources=src, functions=["boom"], verbose=False)
modes = [int(a) for a in sys.argv[1:]] or [0, 1, 2, 3, 4, 5]
for mode in modes:
    x = torch.randn(2, requires_grad=True)
    try:
        mod.boom(x, mode).sum().backward()
        print(mode, "ok", flush=True)
    except RuntimeError as e:
        print(mode, "RuntimeError:", str(e).splitlines()[0][:100], flush=True)
