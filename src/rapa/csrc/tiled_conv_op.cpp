// The tiled convolution on the native kernels as torch operators with their autograd in C++:
// rapa::random_tiled_conv draws the random scheme's assignment itself (the lean call of
// rapa.functional.random_native_conv2d), rapa::tiled_conv takes a given index (every other
// native call of rapa.functional.tiled_conv2d). Both run the kernels without Python's
// autograd.Function and ctypes on every forward and backward (about 56 us of a training step
// of the paper's conv1 at batch 10; README, Benchmarks). Built apart from the kernels, against
// torch's headers and libraries, by rapa/ops/native_op.py, which loads it with
// torch.ops.load_library and hands it the addresses of the kernels that rapa/ops/native.py
// loaded (rapa_set_kernels): this file has none of their code, so the kernels keep their own
// build (-march, $CXX flags) and the ctypes path stays the fallback where this one cannot be
// built.
//
// The geometry arrives as the 24 int64 fields of the kernels' struct Geo, in the order of
// rapa.ops.geometry.NATIVE_FIELDS (which the loader checks against the struct); the operators
// set the layout bits as rapa.ops.native.NativeTiledConv2dFn does and pass the array as the
// struct.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Fwd = int (*)(const void*, const float*, const float*, const float*, const int64_t*, float*);
using BwdW = int (*)(const void*, const float*, const float*, const int64_t*, float*, float*);
using BwdX = int (*)(const void*, const float*, const float*, const int64_t*, float*);
using Draw = int (*)(uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t*);

struct Kernels {  // set once by the loader (rapa_set_kernels) before the operator is called
  Fwd fwd = nullptr;
  BwdW bwd_w = nullptr;
  BwdX bwd_x = nullptr;
  Draw draw = nullptr;
  int64_t state_bytes = 0;  // the generator state's bytes that the draw reads
} kernels;

// indices into the geometry (rapa.ops.geometry.NATIVE_FIELDS)
constexpr int64_t NGEO = 24, N = 0, OH = 10, OW = 11, NT = 12, COUT = 13, M = 17, NTH = 18, LAYOUT = 23;

// Whether x (N, C, H, W) has its channels innermost (rapa.ops.native._is_nhwc).
bool is_nhwc(const at::Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1 && x.stride(2) >= x.size(1); }

// x as the kernels read it: dense (N, H, W, C) when nhwc, else dense (N, C, H, W).
at::Tensor dense(const at::Tensor& x, bool nhwc) { return nhwc ? x.permute({0, 2, 3, 1}).contiguous() : x.contiguous(); }

const float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* fout(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; }

// The index (N, nt, M) of the random scheme drawn from the generator (torch's default CPU
// generator when none is given), exactly as N calls of torch.randperm would draw it, and the
// generator left where they would leave it (rapa_randperm_rows on its state).
at::Tensor draw(const std::optional<at::Generator>& generator, const std::vector<int64_t>& geo) {
  at::Generator gen = generator.has_value() && generator->defined() ? *generator : at::detail::getDefaultCPUGenerator();
  const int64_t n = geo[N], nt = geo[NT], np = geo[OH] * geo[OW];
  at::Tensor index = at::empty({n, nt, geo[M]}, at::kLong);
  std::lock_guard<std::mutex> lock(gen.mutex());
  at::Tensor state = gen.get_state();  // a fresh, dense uint8 tensor
  TORCH_CHECK(state.numel() >= kernels.state_bytes, "rapa::random_tiled_conv: a generator state of ", state.numel(),
              " bytes, fewer than the draw reads");
  TORCH_CHECK(kernels.draw(state.mutable_data_ptr<uint8_t>(), n, np, nt, geo[NTH], index.mutable_data_ptr<int64_t>()) == 0,
              "rapa::random_tiled_conv: the native draw refused this generator state or size");
  gen.set_state(state);
  return index;
}

// The forward: out (N, cout, oh, ow) in x's memory format, and the index: `given` (int64,
// (B, nt, M)) or, undefined, drawn from the generator. covered: every output pixel is listed
// (else out starts at zero and layout bit 2 tells the kernel).
std::pair<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                               const std::optional<at::Generator>& generator, const at::Tensor& given,
                                               std::vector<int64_t> geo, bool covered) {
  TORCH_CHECK(kernels.fwd != nullptr, "rapa::tiled_conv: called before rapa_set_kernels");
  TORCH_CHECK(int64_t(geo.size()) == NGEO, "rapa::tiled_conv: a geometry of ", geo.size(), " fields, not ", NGEO);
  const bool nhwc = is_nhwc(x);
  geo[LAYOUT] = (nhwc ? 0 : 1) | (covered ? 0 : 4);
  const at::Tensor index = given.defined() ? given.contiguous() : draw(generator, geo);
  TORCH_CHECK(index.scalar_type() == at::kLong, "rapa::tiled_conv: the index must be int64");
  const at::Tensor xc = dense(x, nhwc), wc = weight.contiguous(), bc = bias.defined() ? bias.contiguous() : bias;
  const int64_t n = geo[N], cout = geo[COUT], oh = geo[OH], ow = geo[OW];
  const auto shape = nhwc ? std::vector<int64_t>{n, oh, ow, cout} : std::vector<int64_t>{n, cout, oh, ow};
  at::Tensor out = covered ? at::empty(shape, x.options()) : at::zeros(shape, x.options());
  TORCH_CHECK(kernels.fwd(geo.data(), fptr(xc), fptr(wc), fptr(bc), index.data_ptr<int64_t>(), fout(out)) == 0,
              "rapa::tiled_conv: the forward kernel failed");
  return {nhwc ? out.permute({0, 3, 1, 2}) : out, index};
}

}  // namespace

namespace rapa_op {  // named: the profiler shows the backward as torch::autograd::CppNode<rapa_op::TiledConv>

// Both operators' autograd: the index given (index) or drawn (generator); saves x, the weight
// and the index, as NativeTiledConv2dFn does (the backward pads the input again).
struct TiledConv : public torch::autograd::Function<TiledConv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Generator>& generator,
                            const std::optional<at::Tensor>& index, const std::vector<int64_t>& geo, bool covered) {
    auto [out, used] = forward_impl(x, weight, bias.value_or(at::Tensor()), generator, index.value_or(at::Tensor()),
                                    geo, covered);
    ctx->save_for_backward({x, weight, used});
    ctx->saved_data["geo"] = geo;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &index = saved[2];
    std::vector<int64_t> geo = ctx->saved_data["geo"].toIntVector();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    // (the edges are the defined inputs: without a bias there is no third)
    const bool need_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);
    const at::Tensor& grad = grads[0];
    const bool nhwc = is_nhwc(x), g_nhwc = is_nhwc(grad);
    const at::Tensor g = dense(grad, g_nhwc);
    geo[LAYOUT] = (nhwc ? 0 : 1) | (g_nhwc ? 0 : 2);
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    const int64_t nt = weight.size(0), cout = weight.size(1), kh = weight.size(3), kw = weight.size(4);
    at::Tensor gx, gw, gb;
    if (need_w || need_b) {
      const at::Tensor xc = need_w ? dense(x, nhwc) : at::Tensor();
      if (need_w) gw = at::empty({nt, cout, c, kh, kw}, x.options());
      if (need_b) gb = at::empty({nt, cout}, x.options());
      TORCH_CHECK(kernels.bwd_w(geo.data(), fptr(xc), fptr(g), index.data_ptr<int64_t>(), fout(gw), fout(gb)) == 0,
                  "rapa::tiled_conv: the weight-gradient kernel failed");
    }
    if (need_x) {
      gx = nhwc ? at::empty({n, h, w, c}, x.options()) : at::empty({n, c, h, w}, x.options());
      const at::Tensor wc = weight.contiguous();
      TORCH_CHECK(kernels.bwd_x(geo.data(), fptr(g), fptr(wc), index.data_ptr<int64_t>(), fout(gx)) == 0,
                  "rapa::tiled_conv: the input-gradient kernel failed");
      if (nhwc) gx = gx.permute({0, 3, 1, 2});  // (N, C, H, W) channels-last memory
    }
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};  // one per argument
  }
};

}  // namespace rapa_op

namespace {

using rapa_op::TiledConv;

at::Tensor random_tiled_conv_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Generator>& generator, at::IntArrayRef geo) {
  return TiledConv::apply(x, weight, bias, generator, std::optional<at::Tensor>(), geo.vec(), true);
}

at::Tensor random_tiled_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Generator>& generator, at::IntArrayRef geo) {
  return forward_impl(x, weight, bias.value_or(at::Tensor()), generator, at::Tensor(), geo.vec(), true).first;
}

at::Tensor tiled_conv_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& index, at::IntArrayRef geo, bool covered) {
  return TiledConv::apply(x, weight, bias, std::optional<at::Generator>(), std::optional<at::Tensor>(index), geo.vec(),
                          covered);
}

at::Tensor tiled_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& index, at::IntArrayRef geo, bool covered) {
  return forward_impl(x, weight, bias.value_or(at::Tensor()), std::nullopt, index, geo.vec(), covered).first;
}

}  // namespace

TORCH_LIBRARY(rapa, m) {
  m.def("random_tiled_conv(Tensor x, Tensor weight, Tensor? bias, Generator? generator, int[] geo) -> Tensor");
  m.def("tiled_conv(Tensor x, Tensor weight, Tensor? bias, Tensor index, int[] geo, bool covered) -> Tensor");
}
TORCH_LIBRARY_IMPL(rapa, Autograd, m) {
  m.impl("random_tiled_conv", &random_tiled_conv_autograd);
  m.impl("tiled_conv", &tiled_conv_autograd);
}
TORCH_LIBRARY_IMPL(rapa, CPU, m) {
  m.impl("random_tiled_conv", &random_tiled_conv_cpu);
  m.impl("tiled_conv", &tiled_conv_cpu);
}

extern "C" {
// The kernels' addresses (rapa_tiled_conv_fwd, _bwd_w, _bwd_x, rapa_randperm_rows of the loaded
// kernels library) and rapa_generator_state_bytes()'s value.
void rapa_set_kernels(void* fwd, void* bwd_w, void* bwd_x, void* draw, int64_t state_bytes) {
  kernels = Kernels{reinterpret_cast<Fwd>(fwd), reinterpret_cast<BwdW>(bwd_w), reinterpret_cast<BwdX>(bwd_x),
                    reinterpret_cast<Draw>(draw), state_bytes};
}
}
