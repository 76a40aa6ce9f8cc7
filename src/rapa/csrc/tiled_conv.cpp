// Native CPU kernels of the RAPA convolution (float32, channels-last), loaded by rapa/ops/native.py.
//
// A tiled convolution computes every output pixel p of image b with one of nt kernel matrices,
// t = the tile that the assignment index gives p. The index (B, nt, M) lists, for every image
// b (B = 1: the same list for all images) and tile t, the M pixels that t computes; a value
// outside [0, np) is an empty slot. A group (b, t) is therefore a small GEMM with one weight
// matrix: out[p, :] = bias[t] + patch(p) . W[t], patch(p) of length K = kh*kw*C read in
// (kh, kw, C) order straight from the padded channels-last input (an "implicit GEMM": no
// patch matrix is ever written). A patch is `nseg` contiguous segments of that input: one
// per kernel row (kw*C numbers) when the dilation across is 1, one per kernel offset (C
// numbers) otherwise.
//
// Register-blocked micro-kernels use GCC/Clang vector extensions, so one source compiles to
// AVX-512, AVX2 or SSE/NEON code (-march=native). Work is split with OpenMP into static,
// contiguous ranges (groups for the forward and weight gradient, images for the input
// gradient, which accumulates into overlapping windows); per-thread partial weight gradients
// are summed in thread order, so results are bitwise reproducible for a given thread count.
// Linked to libgomp.so.1, which torch's wheel has already loaded, the kernels run on torch's
// own OpenMP threads (no second thread pool competing for the cores).
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// Vector width (floats) and register blocking: vectors of output channels per micro-kernel
// call (NVMAX), accumulators of the forward and weight-gradient kernels (rows = min(12, ACC /
// vectors of channels)), rows x vectors of the input-gradient kernel. Tuned on Zen 4: AVX-512
// has 32 registers; with 16 (AVX2, SSE, NEON) two vectors of channels per call keep the
// accumulators, weights and broadcasts in registers (four halve the speed: spills).
#if defined(__AVX512F__)
#define RAPA_VW 16
#define RAPA_NVMAX 4
#define RAPA_FWD_ACC 16
#define RAPA_GW_ACC 20
#define RAPA_GX_MR 8
#define RAPA_GX_SV 3
#else
#if defined(__AVX__)
#define RAPA_VW 8
#else
#define RAPA_VW 4
#endif
#define RAPA_NVMAX 2
#define RAPA_FWD_ACC 12
#define RAPA_GW_ACC 12
#define RAPA_GX_MR 4
#define RAPA_GX_SV 3
#endif

namespace {

constexpr int VW = RAPA_VW;
constexpr int NVMAX = RAPA_NVMAX;  // vectors of output channels per micro-kernel call
constexpr int64_t PB = 256;    // pixels per chunk of the weight gradient
constexpr int64_t PBX = 64;    // pixels per chunk of the input gradient
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
// A vector loaded once and kept in a register: GCC would otherwise fold the load into every
// FMA that uses it (one load per FMA, which makes the load ports the bottleneck).
inline vf vload_reg(const float* p) {
  vf v = vload(p);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#endif
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

}  // namespace

// The geometry of one call, passed by pointer to every kernel. Mirrored field by field by
// rapa.ops.geometry.NativeGeometry (a ctypes.Structure; the loader compares the layouts).
struct Geo {
  int64_t n, c;      // images, input channels
  int64_t hp, wp;    // the input's size with its zero padding
  int64_t kh, kw;    // kernel window
  int64_t sh, sw;    // stride
  int64_t dh, dw;    // dilation
  int64_t oh, ow;    // output grid
  int64_t nt, cout;  // tiles (kernel matrices), output channels
  int64_t cp, kp;    // cout and the patch length K = kh*kw*C rounded up to whole vectors
  int64_t bsz, m;    // the gather index is (bsz, nt, m), bsz in {1, n}
  int64_t nth;       // OpenMP threads
  int64_t h, w;      // the input's size
  int64_t ph, pw;    // zero padding on both sides
  // depthwise kernels only: bit 0, x, the output and the input gradient are NCHW (else NHWC);
  // bit 1, the output gradient is NCHW
  int64_t layout;
  int64_t np() const { return oh * ow; }
  int64_t k() const { return kh * kw * c; }
};
static_assert(sizeof(Geo) == 24 * sizeof(int64_t), "Geo: 24 int64 fields, no padding");

namespace {

struct Segs {  // the contiguous runs of the padded input that make a patch
  int64_t nseg, len;
  std::vector<int64_t> off;  // (nseg,) offset of each run from the patch's first number
  explicit Segs(const Geo& g) {
    if (g.dw == 1) {
      nseg = g.kh, len = g.kw * g.c;
      for (int64_t i = 0; i < g.kh; ++i) off.push_back(i * g.dh * g.wp * g.c);
    } else {
      nseg = g.kh * g.kw, len = g.c;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) off.push_back((i * g.dh * g.wp + j * g.dw) * g.c);
    }
  }
};

inline void split(int64_t items, int tid, int nth, int64_t* i0, int64_t* i1) {
  *i0 = items * tid / nth;
  *i1 = items * (tid + 1) / nth;
}

// Fill pix with the valid pixels of group (b, t) and base with the offset of each one's patch
// in the padded input (pbase: the offsets within an image); return how many there are.
inline int64_t group(const Geo& g, const int64_t* index, const int64_t* pbase, int64_t b,
                     int64_t t, int64_t* pix, int64_t* base) {
  const int64_t* row = index + ((g.bsz == 1 ? 0 : b) * g.nt + t) * g.m;
  const int64_t np = g.np(), img = b * g.hp * g.wp * g.c;
  int64_t cnt = 0;
  for (int64_t i = 0; i < g.m; ++i) {
    const int64_t p = row[i];
    if (p < 0 || p >= np) continue;  // empty slot
    pix[cnt] = p;
    base[cnt++] = img + pbase[p];
  }
  return cnt;
}

// pbase (np,): where each output pixel's patch starts in a padded image.
inline void pixel_bases(const Geo& g, std::vector<int64_t>& pbase) {
  pbase.resize(g.np());
  for (int64_t oy = 0, p = 0; oy < g.oh; ++oy)
    for (int64_t ox = 0; ox < g.ow; ++ox, ++p) pbase[p] = (oy * g.sh * g.wp + ox * g.sw) * g.c;
}

// Calls f(std::integral_constant<int, v>) for the v in [1, MAX] that equals n.
template <int MAX, class F>
inline void dispatch(int64_t n, F&& f) {
  if constexpr (MAX > 0) {
    if (n == MAX) f(std::integral_constant<int, MAX>{});
    else dispatch<MAX - 1>(n, f);
  }
}

constexpr int rows_for(int nv) { return std::min(12, RAPA_FWD_ACC / nv); }
constexpr int krows_for(int nv) { return std::min(12, RAPA_GW_ACC / nv); }

// Forward: MR pixels x NV*VW channels. base: the MR patches' offsets in xp; koff (K,): the
// offset of every patch entry from its patch's first number; w: (K, cp) at the column block;
// out rows get `valid` channels. One flat loop over K keeps the accumulators in registers.
template <int MR, int NV>
void fwd_block(const float* xp, const int64_t* base, const int64_t* koff, int64_t k, const float* w,
               int64_t cp, const float* bias, float* out, const int64_t* pix, int64_t orow,
               int64_t cout, int64_t valid) {
  vf acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const vf b0 = bias ? vload(bias + v * VW) : vf{};
    for (int r = 0; r < MR; ++r) acc[r][v] = b0;
  }
  const float* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = xp + base[r];
  for (int64_t q = 0; q < k; ++q, w += cp) {
    const int64_t o = koff[q];
    vf wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = vload_reg(w + v * VW);
    for (int r = 0; r < MR; ++r) {
      const float x = a[r][o];
      for (int v = 0; v < NV; ++v) acc[r][v] += wv[v] * x;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* dst = out + (orow + pix[r]) * cout;
    if (valid == NV * VW) {
      for (int v = 0; v < NV; ++v) vstore(dst + v * VW, acc[r][v]);
    } else {
      float tmp[NV * VW];
      for (int v = 0; v < NV; ++v) vstore(tmp + v * VW, acc[r][v]);
      std::memcpy(dst, tmp, valid * sizeof(float));
    }
  }
}

// Weight gradient: MK consecutive patch entries (k0..k0+MK, one segment) x NV*VW channels,
// summed over cnt pixels and added to gw (MK rows of cp).
template <int MK, int NV>
void gw_block(const float* xp, const int64_t* base, int64_t koff, const float* G, int64_t cp,
              int64_t cnt, float* gw) {
  vf acc[MK][NV] = {};
  for (int64_t r = 0; r < cnt; ++r) {
    const float* ar = xp + base[r] + koff;
    vf gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = vload_reg(G + r * cp + v * VW);
    for (int j = 0; j < MK; ++j) {
      const float x = ar[j];
      for (int v = 0; v < NV; ++v) acc[j][v] += gv[v] * x;
    }
  }
  for (int j = 0; j < MK; ++j)
    for (int v = 0; v < NV; ++v) vstore(gw + j * cp + v * VW, vload(gw + j * cp + v * VW) + acc[j][v]);
}

// Input gradient: the patch gradients of MR pixels for SV*VW patch entries,
// T[r, :] = G[r, :cout] . W2[:, kv block] (W2 (cout, kp) at the block).
template <int MR, int SV>
void gx_block(const float* G, int64_t cp, int64_t cout, const float* w2, int64_t kp, float* T) {
  vf acc[MR][SV] = {};
  for (int64_t n = 0; n < cout; ++n) {
    vf wv[SV];
    for (int v = 0; v < SV; ++v) wv[v] = vload_reg(w2 + n * kp + v * VW);
    for (int r = 0; r < MR; ++r) {
      const float gg = G[r * cp + n];
      for (int v = 0; v < SV; ++v) acc[r][v] += wv[v] * gg;
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < SV; ++v) vstore(T + r * kp + v * VW, acc[r][v]);
}

// Image b of x (N, H, W, C) into xp (N, Hp, Wp, C) with its zero border.
inline void pad_image(const Geo& g, const float* x, int64_t b, float* xp) {
  const int64_t row = g.wp * g.c, inner = g.w * g.c;
  float* img = xp + b * g.hp * row;
  std::fill(img, img + g.ph * row, 0.f);
  for (int64_t y = 0; y < g.h; ++y) {
    float* dst = img + (g.ph + y) * row;
    std::fill(dst, dst + g.pw * g.c, 0.f);
    std::memcpy(dst + g.pw * g.c, x + (b * g.h + y) * inner, inner * sizeof(float));
    std::fill(dst + g.pw * g.c + inner, dst + row, 0.f);
  }
  std::fill(img + (g.ph + g.h) * row, img + g.hp * row, 0.f);
}

// Copy the output-gradient rows of cnt pixels of image b into G (cnt, cp), zero-padded.
inline void pack_g(const Geo& g, const float* grad, int64_t b, const int64_t* pix, int64_t cnt,
                   float* G) {
  const int64_t np = g.np();
  for (int64_t r = 0; r < cnt; ++r) {
    std::memcpy(G + r * g.cp, grad + (b * np + pix[r]) * g.cout, g.cout * sizeof(float));
    std::fill(G + r * g.cp + g.cout, G + (r + 1) * g.cp, 0.f);
  }
}

struct Scratch {  // per-thread buffers, kept between calls (OpenMP threads persist)
  std::vector<int64_t> pix, base, pbase, koff;
  std::vector<float> G, T, gw, gb;
  std::vector<float> img_x, img_g, img_o;  // depthwise: one image's input, gradient, output

  // Room for one group's pixels and patch offsets, and the pixel offsets of this geometry.
  void prepare(const Geo& g) {
    pix.resize(g.m), base.resize(g.m);
    pixel_bases(g, pbase);
  }
  // The valid pixels of group (b, t) into pix and base; how many there are.
  int64_t group_of(const Geo& g, const int64_t* index, int64_t b, int64_t t) {
    return group(g, index, pbase.data(), b, t, pix.data(), base.data());
  }
};
thread_local Scratch scratch;

}  // namespace

extern "C" {

int rapa_vector_width() { return VW; }
// The byte offset of every field of Geo into offsets (24 entries, in the order of
// rapa.ops.geometry.NATIVE_FIELDS); returns sizeof(Geo). The loader compares both with
// NativeGeometry, so that a field renamed, added or moved on one side only is caught.
int64_t rapa_geometry_layout(int64_t* offsets) {
  const int64_t offs[] = {
      offsetof(Geo, n),  offsetof(Geo, c),    offsetof(Geo, hp),  offsetof(Geo, wp),     offsetof(Geo, kh),
      offsetof(Geo, kw), offsetof(Geo, sh),   offsetof(Geo, sw),  offsetof(Geo, dh),     offsetof(Geo, dw),
      offsetof(Geo, oh), offsetof(Geo, ow),   offsetof(Geo, nt),  offsetof(Geo, cout),   offsetof(Geo, cp),
      offsetof(Geo, kp), offsetof(Geo, bsz),  offsetof(Geo, m),   offsetof(Geo, nth),    offsetof(Geo, h),
      offsetof(Geo, w),  offsetof(Geo, ph),   offsetof(Geo, pw),  offsetof(Geo, layout)};
  std::memcpy(offsets, offs, sizeof offs);
  return sizeof(Geo);
}

// x (N, H, W, C) is padded into the scratch xp (N, Hp, Wp, C). out (N*np, cout): written for
// every listed pixel (the caller zeroes it if some are not). w: (nt, K, cp); bias: (nt, cp) or
// null.
int rapa_tiled_conv_fwd(const Geo* geo, const float* x, float* xp, const float* w,
                        const float* bias, const int64_t* index, float* out) {
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const Segs sg(g);
  const int64_t k = g.k(), np = g.np();
#pragma omp parallel num_threads(g.nth)
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < g.n; ++b) pad_image(g, x, b, xp);  // (a barrier follows)
    int64_t i0, i1;
    split(g.n * g.nt, omp_get_thread_num(), omp_get_num_threads(), &i0, &i1);
    Scratch& sc = scratch;
    sc.prepare(g);
    sc.koff.resize(k);
    for (int64_t q = 0; q < sg.nseg; ++q)
      for (int64_t e = 0; e < sg.len; ++e) sc.koff[q * sg.len + e] = sg.off[q] + e;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / g.nt, t = i % g.nt;
      const int64_t cnt = sc.group_of(g, index, b, t);
      for (int64_t c0 = 0; c0 < g.cp; c0 += NVMAX * VW) {
        const int64_t nv = std::min<int64_t>(NVMAX, (g.cp - c0) / VW);
        const int64_t valid = std::min<int64_t>(nv * VW, g.cout - c0);
        const float* wt = w + t * k * g.cp + c0;
        const float* bt = bias ? bias + t * g.cp + c0 : nullptr;
        dispatch<NVMAX>(nv, [&](auto NVc) {
          constexpr int NV = decltype(NVc)::value, MR = rows_for(NV);
          for (int64_t r0 = 0; r0 < cnt; r0 += MR) {
            dispatch<MR>(std::min<int64_t>(MR, cnt - r0), [&](auto R) {
              fwd_block<decltype(R)::value, NV>(xp, sc.base.data() + r0, sc.koff.data(), k, wt, g.cp, bt,
                                                out + c0, sc.pix.data() + r0, b * np, g.cout, valid);
            });
          }
        });
      }
    }
  }
  return 0;
}

// gw (nt, cout, C, kh, kw) and gb (nt, cout): the weight and bias gradients, either may be null
// (x and xp are only read for gw). Each thread sums its groups into its own scratch; after a
// barrier the threads sum those partials in thread order (deterministic for a thread count)
// into gw, rows split among them.
int rapa_tiled_conv_bwd_w(const Geo* geo, const float* x, float* xp, const float* grad,
                          const int64_t* index, float* gw, float* gb) {
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const Segs sg(g);
  const int64_t k = g.k();
  std::vector<float*> part_w(g.nth), part_b(g.nth);
#pragma omp parallel num_threads(g.nth)
  {
    if (gw) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < g.n; ++b) pad_image(g, x, b, xp);
    }
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t i0, i1;
    split(g.n * g.nt, tid, nth, &i0, &i1);
    Scratch& sc = scratch;
    sc.prepare(g);
    sc.G.resize(PB * g.cp);
    if (gw) sc.gw.assign(g.nt * k * g.cp, 0.f), part_w[tid] = sc.gw.data();
    if (gb) sc.gb.assign(g.nt * g.cp, 0.f), part_b[tid] = sc.gb.data();
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / g.nt, t = i % g.nt;
      const int64_t cnt = sc.group_of(g, index, b, t);
      for (int64_t r0 = 0; r0 < cnt; r0 += PB) {
        const int64_t rc = std::min(PB, cnt - r0);
        const int64_t* base = sc.base.data() + r0;
        float* G = sc.G.data();
        pack_g(g, grad, b, sc.pix.data() + r0, rc, G);
        if (gb) {
          float* gbt = sc.gb.data() + t * g.cp;
          for (int64_t r = 0; r < rc; ++r)
            for (int64_t j = 0; j < g.cout; ++j) gbt[j] += G[r * g.cp + j];
        }
        if (!gw) continue;
        float* gwt = sc.gw.data() + t * k * g.cp;
        for (int64_t c0 = 0; c0 < g.cp; c0 += NVMAX * VW) {
          const int64_t nv = std::min<int64_t>(NVMAX, (g.cp - c0) / VW);
          dispatch<NVMAX>(nv, [&](auto NVc) {
            constexpr int NV = decltype(NVc)::value, MK = krows_for(NV);
            for (int64_t s = 0; s < sg.nseg; ++s) {
              for (int64_t e0 = 0; e0 < sg.len; e0 += MK) {
                dispatch<MK>(std::min<int64_t>(MK, sg.len - e0), [&](auto J) {
                  gw_block<decltype(J)::value, NV>(xp, base, sg.off[s] + e0, G + c0, g.cp, rc,
                                                   gwt + (s * sg.len + e0) * g.cp + c0);
                });
              }
            }
          });
        }
      }
    }
#pragma omp barrier
    if (gw) {  // rows (t, q) of K entries in (kh, kw, C) order -> gw[t, n, c, i, j]
      const int64_t khw = g.kh * g.kw;
      split(g.nt * k, tid, nth, &i0, &i1);
      for (int64_t row = i0; row < i1; ++row) {
        const int64_t t = row / k, q = row % k, c = q % g.c, ij = q / g.c;
        float* dst = gw + (t * g.cout * g.c + c) * khw + ij;
        for (int64_t n = 0; n < g.cout; ++n) {
          float acc = 0.f;
          for (int j = 0; j < nth; ++j) acc += part_w[j][row * g.cp + n];
          dst[n * g.c * khw] = acc;
        }
      }
    }
    if (gb) {
      split(g.nt * g.cout, tid, nth, &i0, &i1);
      for (int64_t e = i0; e < i1; ++e) {
        float acc = 0.f;
        for (int j = 0; j < nth; ++j) acc += part_b[j][(e / g.cout) * g.cp + e % g.cout];
        gb[e] = acc;
      }
    }
  }
  return 0;
}

// Free the scratch of the calling thread and of nth OpenMP threads.
void rapa_clear_scratch(int64_t nth) {
#pragma omp parallel num_threads(nth)
  scratch = Scratch();
}

// gx (N, H, W, C): every listed pixel's patch gradient summed over its window, accumulated in
// the scratch gxp (N, Hp, Wp, C). w2: (nt, cout, kp), the weights transposed, K zero-padded.
int rapa_tiled_conv_bwd_x(const Geo* geo, const float* grad, const float* w2,
                          const int64_t* index, float* gxp, float* gx) {
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const Segs sg(g);
  constexpr int MR = RAPA_GX_MR, SVMAX = RAPA_GX_SV;
#pragma omp parallel num_threads(g.nth)
  {
    int64_t b0, b1;
    split(g.n, omp_get_thread_num(), omp_get_num_threads(), &b0, &b1);
    Scratch& sc = scratch;
    sc.prepare(g);
    sc.G.resize(PBX * g.cp), sc.T.resize(PBX * g.kp);
    float* T = sc.T.data();
    const int64_t row = g.wp * g.c, inner = g.w * g.c;
    for (int64_t b = b0; b < b1; ++b) {  // images do not share windows: one thread each
      float* img = gxp + b * g.hp * row;
      std::fill(img, img + g.hp * row, 0.f);
      for (int64_t t = 0; t < g.nt; ++t) {
        const int64_t cnt = sc.group_of(g, index, b, t);
        const float* w2t = w2 + t * g.cout * g.kp;
        // chunks of PBX pixels: each block of SVMAX*VW patch entries of the weights (cout rows)
        // stays in L1 while every row block of the chunk uses it; T holds the chunk's patch
        // gradients (in L2) until they are added into their windows
        for (int64_t q0 = 0; q0 < cnt; q0 += PBX) {
          const int64_t qc = std::min(PBX, cnt - q0);
          float* G = sc.G.data();
          pack_g(g, grad, b, sc.pix.data() + q0, qc, G);
          for (int64_t v0 = 0; v0 < g.kp / VW; v0 += SVMAX) {
            const int64_t sv = std::min<int64_t>(SVMAX, g.kp / VW - v0);
            for (int64_t r0 = 0; r0 < qc; r0 += MR) {
              dispatch<MR>(std::min<int64_t>(MR, qc - r0), [&](auto R) {
                dispatch<SVMAX>(sv, [&](auto S) {
                  gx_block<decltype(R)::value, decltype(S)::value>(G + r0 * g.cp, g.cp, g.cout,
                                                                   w2t + v0 * VW, g.kp,
                                                                   T + r0 * g.kp + v0 * VW);
                });
              });
            }
          }
          for (int64_t r = 0; r < qc; ++r) {  // add the patch gradients into the windows
            const float* src = T + r * g.kp;
            const int64_t at = sc.base[q0 + r];
            for (int64_t s = 0; s < sg.nseg; ++s) {
              float* dst = gxp + at + sg.off[s];
              const float* sr = src + s * sg.len;
              for (int64_t e = 0; e < sg.len; ++e) dst[e] += sr[e];
            }
          }
        }
      }
      for (int64_t y = 0; y < g.h; ++y)  // the image's gradient without the border
        std::memcpy(gx + (b * g.h + y) * inner, img + (g.ph + y) * row + g.pw * g.c, inner * sizeof(float));
    }
  }
  return 0;
}

// Depthwise layers (groups == C == cout): every channel has its own 1 x kh*kw kernel per tile,
// so the work is vectorised across channels instead: a pixel's output vector for channels
// c0..c0+VW is the sum over the kh*kw kernel offsets of an input vector times a weight vector.
// w: (nt, kh*kw, cp), bias: (nt, cp), both zero-padded to whole vectors; a last, partial
// vector of channels is read and written with its `valid` lanes only. The work is split by
// images; an NCHW image (Geo::layout) is transposed into channels-last scratch in cache, and
// its result back, so no full-size transposed copy is made.
}  // extern "C"
namespace {

inline vf loadn(const float* p, int64_t valid) {
  vf v = {};
  std::memcpy(&v, p, valid * sizeof(float));
  return v;
}
inline void storen(float* p, vf v, int64_t valid) { std::memcpy(p, &v, valid * sizeof(float)); }

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols, in cache-sized blocks.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  constexpr int64_t B = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += B)
    for (int64_t j0 = 0; j0 < cols; j0 += B) {
      const int64_t i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
}

// Image b of x as (H*W, C) channels-last: x itself (NHWC) or its transpose in buf (NCHW).
inline const float* image_nhwc(const Geo& g, const float* x, int64_t b, bool nchw, std::vector<float>& buf) {
  const int64_t hw = g.h * g.w;
  if (!nchw) return x + b * hw * g.c;
  buf.resize(hw * g.c);
  transpose(x + b * g.c * hw, g.c, hw, hw, buf.data(), g.c);
  return buf.data();
}

// Image b of the output gradient (np, C) channels-last, likewise.
inline const float* grad_nhwc(const Geo& g, const float* grad, int64_t b, std::vector<float>& buf) {
  const int64_t np = g.np();
  if (!(g.layout & 2)) return grad + b * np * g.c;
  buf.resize(np * g.c);
  transpose(grad + b * g.c * np, g.c, np, np, buf.data(), g.c);
  return buf.data();
}

// Sum over cnt terms of vectors a[j] + o times b[j] + o, NV vectors of channels (the last one
// partial with `tail` lanes when TAIL), plus `init` (bias or null), stored to dst.
template <int NV, bool TAIL>
inline void dw_dot(const float* const* a, const float* const* b, int64_t o, int64_t cnt,
                   const float* init, float* dst, int64_t tail) {
  vf acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = init ? vload(init + v * VW) : vf{};
  for (int64_t j = 0; j < cnt; ++j) {
    const float* aj = a[j] + o;
    const float* bj = b[j] + o;
    for (int v = 0; v < NV; ++v) {
      const vf x = (TAIL && v == NV - 1) ? loadn(aj + v * VW, tail) : vload(aj + v * VW);
      acc[v] += x * vload(bj + v * VW);
    }
  }
  for (int v = 0; v < NV; ++v) {
    if (TAIL && v == NV - 1) storen(dst + v * VW, acc[v], tail);
    else vstore(dst + v * VW, acc[v]);
  }
}

// dst[0:C] = init + sum_j a[j][0:C] * b[j][0:C], vectors of channels in blocks of up to DWNV.
constexpr int DWNV = 4;
inline void dw_row(const float* const* a, const float* const* b, int64_t cnt, const float* init,
                   float* dst, int64_t c) {
  const int64_t full = c / VW, tail = c % VW;
  int64_t v0 = 0;
  for (; v0 + DWNV <= full; v0 += DWNV) {
    const int64_t o = v0 * VW;
    dw_dot<DWNV, false>(a, b, o, cnt, init ? init + o : nullptr, dst + o, 0);
  }
  const int64_t rest = full - v0 + (tail ? 1 : 0);  // vectors left, the last maybe partial
  if (!rest) return;
  const int64_t o = v0 * VW;
  dispatch<DWNV>(rest, [&](auto R) {
    constexpr int NV = decltype(R)::value;
    if (tail) dw_dot<NV, true>(a, b, o, cnt, init ? init + o : nullptr, dst + o, tail);
    else dw_dot<NV, false>(a, b, o, cnt, init ? init + o : nullptr, dst + o, 0);
  });
}

// The tile of every output pixel of image b (-1: no slot lists it) into tmap (np,).
inline void tile_map(const Geo& g, const int64_t* index, int64_t b, int64_t* tmap) {
  const int64_t np = g.np();
  std::fill(tmap, tmap + np, int64_t(-1));
  const int64_t* rows = index + (g.bsz == 1 ? 0 : b) * g.nt * g.m;
  for (int64_t t = 0; t < g.nt; ++t)
    for (int64_t i = 0; i < g.m; ++i) {
      const int64_t p = rows[t * g.m + i];
      if (p >= 0 && p < np) tmap[p] = t;
    }
}

constexpr int DWQ = 9;  // kernel entries whose weight-gradient accumulators stay in registers

// The per-thread frame of the depthwise forward and input gradient: the images split among the
// threads, an image's tile map, pointer arrays for the kh*kw terms of one sum, and where an
// image's channels-last result goes (out itself, or scratch transposed into the NCHW out).
// The kernels keep their loops (and the hot pointers in locals) themselves.
struct DwThread {
  int64_t b0 = 0, b1 = 0;  // this thread's images
  Scratch& sc = scratch;
  std::vector<int64_t> tmap;
  std::vector<const float*> a, wq;
  DwThread(const Geo& g, int64_t out_hw) : tmap(g.np()), a(g.kh * g.kw), wq(g.kh * g.kw) {
    split(g.n, omp_get_thread_num(), omp_get_num_threads(), &b0, &b1);
    if (g.layout & 1) sc.img_o.resize(out_hw * g.c);
  }
  // Image b: its tile map into tmap; returns where its channels-last result (out_hw pixels) goes.
  float* start(const Geo& g, const int64_t* index, int64_t b, float* out, int64_t out_hw) {
    tile_map(g, index, b, tmap.data());
    return (g.layout & 1) ? sc.img_o.data() : out + b * out_hw * g.c;
  }
  // Image b's result dst into out, transposed when out is NCHW.
  void finish(const Geo& g, int64_t b, const float* dst, float* out, int64_t out_hw) {
    if (g.layout & 1) transpose(dst, out_hw, g.c, g.c, out + b * g.c * out_hw, out_hw);
  }
};

}  // namespace
extern "C" {

// out (N, C, oh, ow) or (N, oh, ow, C), as x: every pixel written (0 where no slot lists it).
int rapa_dw_fwd(const Geo* geo, const float* x, float* xp, const float* w, const float* bias,
                const int64_t* index, float* out) {
  (void)xp;
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const int64_t kk = g.kh * g.kw, np = g.np();
  const bool nchw = g.layout & 1;
#pragma omp parallel num_threads(g.nth)
  {
    DwThread th(g, np);
    const float** a = th.a.data();
    const float** wq = th.wq.data();
    const int64_t* tmap = th.tmap.data();
    for (int64_t b = th.b0; b < th.b1; ++b) {
      float* dst = th.start(g, index, b, out, np);
      const float* img = image_nhwc(g, x, b, nchw, th.sc.img_x);
      for (int64_t oy = 0, p = 0; oy < g.oh; ++oy)
        for (int64_t ox = 0; ox < g.ow; ++ox, ++p) {
          const int64_t t = tmap[p];
          if (t < 0) {  // perforated away
            std::fill(dst + p * g.c, dst + (p + 1) * g.c, 0.f);
            continue;
          }
          int64_t cnt = 0;  // the kernel offsets inside the image (the zero padding adds nothing)
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
            if (iy < 0 || iy >= g.h) continue;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
              if (ix < 0 || ix >= g.w) continue;
              a[cnt] = img + (iy * g.w + ix) * g.c;
              wq[cnt++] = w + (t * kk + ky * g.kw + kx) * g.cp;
            }
          }
          dw_row(a, wq, cnt, bias ? bias + t * g.cp : nullptr, dst + p * g.c, g.c);
        }
      th.finish(g, b, dst, out, np);
    }
  }
  return 0;
}

// gw (nt, C, 1, kh, kw) and gb (nt, C), either may be null; grad as Geo::layout says. Per-thread
// partials (nt, kk, cp) and (nt, cp), summed in thread order after a barrier (deterministic for
// a thread count). Each image is padded (and transposed) into scratch once.
int rapa_dw_bwd_w(const Geo* geo, const float* x, float* xp, const float* grad,
                  const int64_t* index, float* gw, float* gb) {
  (void)xp;
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const int64_t kk = g.kh * g.kw;
  const bool nchw = g.layout & 1;
  std::vector<float*> part_w(g.nth), part_b(g.nth);
#pragma omp parallel num_threads(g.nth)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t i0, i1;
    split(g.n, tid, nth, &i0, &i1);
    Scratch& sc = scratch;
    sc.prepare(g);
    std::vector<int64_t> koff;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) koff.push_back((i * g.dh * g.wp + j * g.dw) * g.c);
    std::vector<float> pad;  // the image, zero-padded, channels-last
    if (gw) sc.gw.assign(g.nt * kk * g.cp, 0.f), part_w[tid] = sc.gw.data();
    if (gb) sc.gb.assign(g.nt * g.cp, 0.f), part_b[tid] = sc.gb.data();
    for (int64_t b = i0; b < i1; ++b) {
      const float* gimg = grad_nhwc(g, grad, b, sc.img_g);
      if (gw) {
        pad.assign(g.hp * g.wp * g.c, 0.f);
        const int64_t hw = g.h * g.w;
        for (int64_t y = 0; y < g.h; ++y) {
          float* row = pad.data() + ((g.ph + y) * g.wp + g.pw) * g.c;
          if (nchw) transpose(x + b * g.c * hw + y * g.w, g.c, g.w, hw, row, g.c);
          else std::memcpy(row, x + (b * hw + y * g.w) * g.c, g.w * g.c * sizeof(float));
        }
      }
      for (int64_t t = 0; t < g.nt; ++t) {
        // the group's pixels (their patches start at pbase[pixel] in the padded image)
        const int64_t cnt = group(g, index, sc.pbase.data(), b, t, sc.pix.data(), sc.base.data());
        for (int64_t c0 = 0; c0 < g.c; c0 += VW) {
          const int64_t valid = std::min<int64_t>(VW, g.c - c0);
          const bool full = valid == VW;
          if (gb) {
            vf acc = {};
            for (int64_t r = 0; r < cnt; ++r) {
              const float* gp = gimg + sc.pix[r] * g.c + c0;
              acc += full ? vload(gp) : loadn(gp, valid);
            }
            float* dst = sc.gb.data() + t * g.cp + c0;
            vstore(dst, vload(dst) + acc);
          }
          if (!gw) continue;
          for (int64_t q0 = 0; q0 < kk; q0 += DWQ) {
            dispatch<DWQ>(std::min<int64_t>(DWQ, kk - q0), [&](auto Q) {
              constexpr int QN = decltype(Q)::value;
              vf acc[QN] = {};
              if (full) {
                for (int64_t r = 0; r < cnt; ++r) {
                  const vf gv = vload(gimg + sc.pix[r] * g.c + c0);
                  const float* a = pad.data() + sc.pbase[sc.pix[r]] + c0;
                  for (int j = 0; j < QN; ++j) acc[j] += vload(a + koff[q0 + j]) * gv;
                }
              } else {
                for (int64_t r = 0; r < cnt; ++r) {
                  const vf gv = loadn(gimg + sc.pix[r] * g.c + c0, valid);
                  const float* a = pad.data() + sc.pbase[sc.pix[r]] + c0;
                  for (int j = 0; j < QN; ++j) acc[j] += loadn(a + koff[q0 + j], valid) * gv;
                }
              }
              float* dst = sc.gw.data() + (t * kk + q0) * g.cp + c0;
              for (int j = 0; j < QN; ++j) vstore(dst + j * g.cp, vload(dst + j * g.cp) + acc[j]);
            });
          }
        }
      }
    }
#pragma omp barrier
    if (gw) {  // rows (t, c) of gw (nt, C, kk) <- partials (nt, kk, cp)
      split(g.nt * g.c, tid, nth, &i0, &i1);
      for (int64_t row = i0; row < i1; ++row) {
        const int64_t t = row / g.c, c = row % g.c;
        for (int64_t q = 0; q < kk; ++q) {
          float acc = 0.f;
          for (int j = 0; j < nth; ++j) acc += part_w[j][(t * kk + q) * g.cp + c];
          gw[row * kk + q] = acc;
        }
      }
    }
    if (gb) {
      split(g.nt * g.c, tid, nth, &i0, &i1);
      for (int64_t e = i0; e < i1; ++e) {
        float acc = 0.f;
        for (int j = 0; j < nth; ++j) acc += part_b[j][(e / g.c) * g.cp + e % g.c];
        gb[e] = acc;
      }
    }
  }
  return 0;
}

// gx (N, C, H, W) or (N, H, W, C), as x: for every input pixel, the sum over the output pixels
// whose window reads it of their output gradient times their tile's weight at that offset (a
// gather: every input pixel written once). gxp unused.
int rapa_dw_bwd_x(const Geo* geo, const float* grad, const float* w, const int64_t* index,
                  float* gxp, float* gx) {
  (void)gxp;
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const int64_t kk = g.kh * g.kw, hw = g.h * g.w;
#pragma omp parallel num_threads(g.nth)
  {
    DwThread th(g, hw);
    const float** a = th.a.data();
    const float** wq = th.wq.data();
    const int64_t* tmap = th.tmap.data();
    for (int64_t b = th.b0; b < th.b1; ++b) {
      float* dst = th.start(g, index, b, gx, hw);
      const float* gimg = grad_nhwc(g, grad, b, th.sc.img_g);
      for (int64_t iy = 0; iy < g.h; ++iy)
        for (int64_t ix = 0; ix < g.w; ++ix) {
          int64_t cnt = 0;
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t ty = iy + g.ph - ky * g.dh;  // = oy * sh
            if (ty < 0 || ty % g.sh || ty / g.sh >= g.oh) continue;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t tx = ix + g.pw - kx * g.dw;
              if (tx < 0 || tx % g.sw || tx / g.sw >= g.ow) continue;
              const int64_t p = (ty / g.sh) * g.ow + tx / g.sw, t = tmap[p];
              if (t < 0) continue;
              a[cnt] = gimg + p * g.c;
              wq[cnt++] = w + (t * kk + ky * g.kw + kx) * g.cp;
            }
          }
          dw_row(a, wq, cnt, nullptr, dst + (iy * g.w + ix) * g.c, g.c);
        }
      th.finish(g, b, dst, gx, hw);
    }
  }
  return 0;
}

}  // extern "C"
