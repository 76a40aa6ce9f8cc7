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
// Patch entries that fall in the zero padding are skipped where they are at least 10% of the
// work (see Win and Scratch::prepare), as oneDNN's direct convolutions skip them.
//
// Register-blocked micro-kernels use GCC/Clang vector extensions, so one source compiles to
// AVX-512, AVX2 or SSE/NEON code (-march=native). Work is split with OpenMP into static,
// contiguous ranges (groups for the forward and weight gradient, images for the input
// gradient, which accumulates into overlapping windows); per-thread partial weight gradients
// are summed in thread order, so results are bitwise reproducible for a given thread count.
// Linked to libgomp.so.1, which torch's wheel has already loaded, the kernels run on torch's
// own OpenMP threads (no second thread pool competing for the cores).
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
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
#ifndef RAPA_FWD_ACC
#define RAPA_FWD_ACC 16
#endif
#ifndef RAPA_GW_ACC
#define RAPA_GW_ACC 20
#endif
#ifndef RAPA_GX_MR
#define RAPA_GX_MR 4
#endif
#ifndef RAPA_GX_SV
#define RAPA_GX_SV 5
#endif
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
#ifndef RAPA_STACK_PX
#define RAPA_STACK_PX 512
#endif
// Stacks of images (see stack_max): up to STACK_PX slots of a tile, STACK_MAX images, and
// STACK_BYTES of padded images
constexpr int64_t STACK_PX = RAPA_STACK_PX, STACK_MAX = 8, STACK_BYTES = 512 << 10;
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
// Unrolls a loop over a register block completely, so that its arrays of vectors stay in
// registers also where the kernel is not inlined (GCC keeps them on the stack otherwise).
#define RAPA_UNROLL _Pragma("GCC unroll 16")
// Ask for the cache lines of the n floats at p (to be written when write), without waiting.
inline void prefetch_row(const float* p, int64_t n, bool write) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * int64_t(sizeof(float)); o += 64) {
    if (write) __builtin_prefetch(c + o, 1, 3);
    else __builtin_prefetch(c + o, 0, 3);
  }
}

// Scratch floats start on a cache line (malloc gives 16 bytes): with rows of whole vectors
// (channels, cp, kp), every vector load and store of a kernel then stays within one line;
// a vector that straddles two lines costs two loads.
template <class T>
struct LineAlloc {
  typedef T value_type;
  static constexpr std::size_t LINE = 64;
  LineAlloc() = default;
  template <class U>
  LineAlloc(const LineAlloc<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(LINE))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(LINE)); }
  template <class U>
  bool operator==(const LineAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const LineAlloc<U>&) const { return false; }
};
typedef std::vector<float, LineAlloc<float>> fvec;

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
  // bit 0: x, the output and the input gradient are NCHW (else NHWC); bit 1: the output
  // gradient is NCHW; bit 2 (forward): not every output pixel is listed in the index
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
// in the image's padded input (pbase: those offsets by pixel); return how many there are.
inline int64_t group(const Geo& g, const int64_t* index, const int64_t* pbase, int64_t b,
                     int64_t t, int64_t* pix, int64_t* base) {
  const int64_t* row = index + ((g.bsz == 1 ? 0 : b) * g.nt + t) * g.m;
  const int64_t np = g.np();
  int64_t cnt = 0;
  for (int64_t i = 0; i < g.m; ++i) {
    const int64_t p = row[i];
    if (p < 0 || p >= np) continue;  // empty slot
    pix[cnt] = p;
    base[cnt++] = pbase[p];
  }
  return cnt;
}

#if defined(__AVX512F__)
// r[i][j] -> r[j][i] for i, j < 16: a 16 x 16 block transposed in registers, four rounds of
// shuffles.
__attribute__((always_inline)) inline void transpose16_regs(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows, 32-bit interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 64-bit interleaved
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i, j < 16.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  transpose16_regs(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

// The same for i < ni, j < nj (at most 16 each): masked loads and stores, which touch no
// memory outside the part.
inline void transpose16_part(const float* src, int64_t lds, float* dst, int64_t ldd, int ni, int nj) {
  const __mmask16 mj = __mmask16((1u << nj) - 1), mi = __mmask16((1u << ni) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < ni ? _mm512_maskz_loadu_ps(mj, src + i * lds) : _mm512_setzero_ps();
  transpose16_regs(r);
  for (int j = 0; j < nj; ++j) _mm512_mask_storeu_ps(dst + j * ldd, mi, r[j]);
}
#endif

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols, in cache-sized blocks (16 x 16
// blocks in registers with AVX-512). Edge blocks of at least RAPA_TPART numbers go through
// registers too, masked: the 5x5 kernels' weights make blocks of 16 x 9, which a scalar loop
// copied 1.2-1.7x slower; smaller ones (a 3-channel image's 3 x 16) stay scalar, where the
// shuffles cost more than they save (conv1's input gradient 3% slower).
#ifndef RAPA_TPART
#define RAPA_TPART 64
#endif
// by_dst: blocks of destination rows outermost, each set of 16 rows written front to back (the
// forward's NCHW output, (np, cp) -> (cout, np) per image: the paper's conv1 5% faster at batch
// 128; the other transposes, source rows outermost, 6-13% slower that way).
template <bool by_dst = false>
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  constexpr int64_t B = 16;
  for (int64_t a = 0; a < (by_dst ? cols : rows); a += B)
    for (int64_t b = 0; b < (by_dst ? rows : cols); b += B) {
      const int64_t i0 = by_dst ? b : a, j0 = by_dst ? a : b;
      const int64_t i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
#if defined(__AVX512F__)
      if (i1 - i0 == B && j1 - j0 == B) {
        transpose16(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd);
        continue;
      }
      if ((i1 - i0) * (j1 - j0) >= RAPA_TPART) {
        transpose16_part(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd, int(i1 - i0), int(j1 - j0));
        continue;
      }
#endif
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
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

// Forward: MR pixels x NV*VW channels. base: the MR patches' offsets in the padded image xp;
// koff (K,): the offset of every patch entry from its patch's first number; runs (nruns pairs
// q0, q1): the ranges of patch entries to sum (the block's window, see Win); w: (K, cp) at the
// column block; init: the bias there, or null. The sums go to the rows out + pix[r] * cp (whole
// vectors). A flat loop over each run keeps the accumulators in registers.
template <int MR, int NV>
__attribute__((noinline)) void fwd_block(const float* xp, const int64_t* base, const int64_t* koff, const int64_t* runs, int64_t nruns,
               const float* w, int64_t cp, const float* init, float* out, const int64_t* pix) {
  vf acc[MR][NV];
  RAPA_UNROLL
  for (int v = 0; v < NV; ++v) {
    const vf b0 = init ? vload(init + v * VW) : vf{};
    RAPA_UNROLL
    for (int r = 0; r < MR; ++r) acc[r][v] = b0;
  }
  const float* a[MR];
  RAPA_UNROLL
  for (int r = 0; r < MR; ++r) a[r] = xp + base[r];
  for (int64_t u = 0; u < nruns; ++u) {
    const float* wq = w + runs[2 * u] * cp;
    for (int64_t q = runs[2 * u], q1 = runs[2 * u + 1]; q < q1; ++q, wq += cp) {
      const int64_t o = koff[q];
      vf wv[NV];
      RAPA_UNROLL
      for (int v = 0; v < NV; ++v) wv[v] = vload_reg(wq + v * VW);
      RAPA_UNROLL
      for (int r = 0; r < MR; ++r) {
        const float x = a[r][o];
        RAPA_UNROLL
        for (int v = 0; v < NV; ++v) acc[r][v] += wv[v] * x;
      }
    }
  }
  RAPA_UNROLL
  for (int r = 0; r < MR; ++r)
    RAPA_UNROLL
    for (int v = 0; v < NV; ++v) vstore(out + pix[r] * cp + v * VW, acc[r][v]);
}

// Weight gradient: MK consecutive patch entries (k0..k0+MK, one segment) x NV*VW channels,
// summed over the pixels of nrng ranges (pairs r0, r1 of rows of base and G) and added to gw
// (MK rows of cp).
template <int MK, int NV>
__attribute__((noinline)) void gw_block(const float* xp, const int64_t* base, int64_t koff, const float* G, int64_t cp,
              const int64_t* rng, int64_t nrng, float* gw) {
  vf acc[MK][NV] = {};
  for (int64_t u = 0; u < nrng; ++u)
  for (int64_t r = rng[2 * u]; r < rng[2 * u + 1]; ++r) {
    const float* ar = xp + base[r] + koff;
    vf gv[NV];
    RAPA_UNROLL
    for (int v = 0; v < NV; ++v) gv[v] = vload_reg(G + r * cp + v * VW);
    RAPA_UNROLL
    for (int j = 0; j < MK; ++j) {
      const float x = ar[j];
      RAPA_UNROLL
      for (int v = 0; v < NV; ++v) acc[j][v] += gv[v] * x;
    }
  }
  RAPA_UNROLL
  for (int j = 0; j < MK; ++j)
    RAPA_UNROLL
    for (int v = 0; v < NV; ++v) vstore(gw + j * cp + v * VW, vload(gw + j * cp + v * VW) + acc[j][v]);
}

// Input gradient: the patch gradients of MR pixels for SV*VW patch entries,
// G[r, :cout] . W2[:, kv block] (W2 (cout, kp) at the block), stored to row r of T (ADD false:
// dst + r * ld) or added into the padded input gradient (ADD true: row r's entries are a
// contiguous run of its window at dst + at[r]; windows of the block may overlap, and each
// row's adds complete before the next row's).
template <int MR, int SV, bool ADD>
void gx_block(const float* G, int64_t cp, int64_t cout, const float* w2, int64_t kp, float* dst,
              const int64_t* at, int64_t ld) {
  vf acc[MR][SV] = {};
  for (int64_t n = 0; n < cout; ++n) {
    vf wv[SV];
    RAPA_UNROLL
    for (int v = 0; v < SV; ++v) wv[v] = vload_reg(w2 + n * kp + v * VW);
    RAPA_UNROLL
    for (int r = 0; r < MR; ++r) {
      const float gg = G[r * cp + n];
      RAPA_UNROLL
      for (int v = 0; v < SV; ++v) acc[r][v] += wv[v] * gg;
    }
  }
  RAPA_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* row = ADD ? dst + at[r] : dst + r * ld;
    RAPA_UNROLL
    for (int v = 0; v < SV; ++v) vstore(row + v * VW, ADD ? vload(row + v * VW) + acc[r][v] : acc[r][v]);
  }
}

// d[j * 3 + i] = s[i * ld + j] for i < 3, j < n: three channel rows of an NCHW image (RGB)
// interleaved into channels-last order, 16 pixels at a time in registers with AVX-512 (two
// permutes and a blend per vector; the scalar transpose loop took 21 us of a 0.8 ms step of the
// paper's conv1 at batch 10, per thread).
inline void interleave3(const float* s, int64_t ld, int64_t n, float* d) {
  int64_t j0 = 0;
#if defined(__AVX512F__)
  // output vector k, lane e holds pixel j = (16k + e) / 3, channel i = (16k + e) % 3: from
  // channels 0 and 1 by one two-source permute (ab), channel 2's lanes (mc) blended in (cc)
  struct Lanes {
    alignas(64) int32_t ab[3][16], cc[3][16];
    uint16_t mc[3] = {0, 0, 0};
    Lanes() {
      for (int k = 0; k < 3; ++k)
        for (int e = 0; e < 16; ++e) {
          const int p = 16 * k + e, j = p / 3, i = p % 3;
          ab[k][e] = i == 1 ? 16 + j : j, cc[k][e] = j;
          if (i == 2) mc[k] |= uint16_t(1u << e);
        }
    }
  };
  static const Lanes lanes;  // computed once
  __m512i iab[3], icc[3];
  for (int k = 0; k < 3; ++k) iab[k] = _mm512_load_si512(lanes.ab[k]), icc[k] = _mm512_load_si512(lanes.cc[k]);
  for (; j0 + 16 <= n; j0 += 16) {
    const __m512 v0 = _mm512_loadu_ps(s + j0), v1 = _mm512_loadu_ps(s + ld + j0), v2 = _mm512_loadu_ps(s + 2 * ld + j0);
    for (int k = 0; k < 3; ++k) {
      const __m512 o = _mm512_permutex2var_ps(v0, iab[k], v1);
      _mm512_storeu_ps(d + 3 * j0 + 16 * k, _mm512_mask_permutexvar_ps(o, __mmask16(lanes.mc[k]), icc[k], v2));
    }
  }
#endif
  for (int64_t j = j0; j < n; ++j)
    for (int64_t i = 0; i < 3; ++i) d[j * 3 + i] = s[i * ld + j];
}

// Image b of x into pad (Hp, Wp, C) with its zero border: x is (N, H, W, C), or (N, C, H, W)
// when nchw (transposed row by row, in cache: no transposed copy of x is ever made).
inline void pad_image(const Geo& g, const float* x, int64_t b, bool nchw, float* pad) {
  const int64_t row = g.wp * g.c, inner = g.w * g.c, hw = g.h * g.w;
  std::fill(pad, pad + g.ph * row, 0.f);
  for (int64_t y = 0; y < g.h; ++y) {
    float* dst = pad + (g.ph + y) * row;
    std::fill(dst, dst + g.pw * g.c, 0.f);
    if (nchw && g.c == 3) interleave3(x + b * g.c * hw + y * g.w, hw, g.w, dst + g.pw * g.c);
    else if (nchw) transpose(x + b * g.c * hw + y * g.w, g.c, g.w, hw, dst + g.pw * g.c, g.c);
    else std::memcpy(dst + g.pw * g.c, x + (b * g.h + y) * inner, inner * sizeof(float));
    std::fill(dst + g.pw * g.c + inner, dst + row, 0.f);
  }
  std::fill(pad + (g.ph + g.h) * row, pad + g.hp * row, 0.f);
}

// Images b..b+nb of the output gradient as (nb * np, cout) rows: grad itself when it is
// (N, oh, ow, cout), their transposes in buf when it is (N, cout, oh, ow) (Geo::layout bit 1).
inline const float* grad_rows(const Geo& g, const float* grad, int64_t b, int64_t nb, fvec& buf) {
  const int64_t np = g.np();
  if (!(g.layout & 2)) {
    // the kernels read its rows in the drawn order: asked for into L2 in memory order first
    // (whole streams, not a miss per row; 3-5% of conv1's gradients), if it fits there easily
    const char* c = reinterpret_cast<const char*>(grad + b * np * g.cout);
    const int64_t bytes = nb * np * g.cout * int64_t(sizeof(float));
    if (bytes <= (256 << 10))
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
    return grad + b * np * g.cout;
  }
  buf.resize(nb * np * g.cout);
  for (int64_t i = 0; i < nb; ++i)
    transpose(grad + (b + i) * g.cout * np, g.cout, np, np, buf.data() + i * np * g.cout, g.cout);
  return buf.data();
}

// Copy the gradient rows (gimg: (images' np, cout)) of cnt pixels into G (cnt, cp), zero-padded.
inline void pack_g(const Geo& g, const float* gimg, const int64_t* pix, int64_t cnt, float* G) {
  // the rows are scattered over an image's gradient that is mostly not in cache yet: the rows
  // PF ahead are asked for while these are copied (5% of conv1's weight gradient at batch 128)
  constexpr int64_t PF = 8;
  for (int64_t r = 0; r < std::min(PF, cnt); ++r) prefetch_row(gimg + pix[r] * g.cout, g.cout, false);
  for (int64_t r = 0; r < cnt; ++r) {
    if (r + PF < cnt) prefetch_row(gimg + pix[r + PF] * g.cout, g.cout, false);
    const float* src = gimg + pix[r] * g.cout;
    float* dst = G + r * g.cp;
    if (g.cout == g.cp) {  // whole vectors: copied in registers (a memcpy call per row costs more)
      for (int64_t c = 0; c < g.cout; c += VW) vstore(dst + c, vload(src + c));
    } else {
      std::memcpy(dst, src, g.cout * sizeof(float));
      std::fill(dst + g.cout, dst + g.cp, 0.f);
    }
  }
}

// The images that groups [i0, i1) of (image, tile) order touch, and the tiles of image b among them.
inline void tile_range(const Geo& g, int64_t i0, int64_t i1, int64_t b, int64_t* t0, int64_t* t1) {
  *t0 = std::max<int64_t>(i0 - b * g.nt, 0);
  *t1 = std::min<int64_t>(i1 - b * g.nt, g.nt);
}

// With skipping (not `whole`), images go in stacks of up to this many: a tile's pixels from
// several images, sorted by window class together, fill more whole blocks of one class (fewer
// small blocks, fewer unions of windows: conv2's forward 3-4% faster with 4 images, 1-2% more
// with 8 at batch 10)
inline int64_t stack_max(const Geo& g, bool whole) {
  if (whole) return 1;
  const int64_t bytes = g.hp * g.wp * g.c * int64_t(sizeof(float));  // one padded image
  return std::clamp<int64_t>(std::min(STACK_PX / std::max<int64_t>(g.m, 1), STACK_BYTES / std::max<int64_t>(bytes, 1)), 1,
                             STACK_MAX);
}
// The next stack's size with `left` images to go: stacks of nearly equal size (10 images, at
// most 4 a stack: 4, 3, 3).
inline int64_t stack_size(int64_t left, int64_t nbmax) {
  const int64_t nstack = (left + nbmax - 1) / nbmax;
  return (left + nstack - 1) / nstack;
}

// The stack that starts at image b among groups [i0, i1) of (image, tile) order: its tiles
// [t0, t1), and how many images it holds (of those from b on with the same tiles).
inline int64_t next_stack(const Geo& g, int64_t i0, int64_t i1, int64_t b, int64_t nbmax, int64_t* t0, int64_t* t1) {
  tile_range(g, i0, i1, b, t0, t1);
  int64_t e = b + 1, u0, u1;
  while (e * g.nt < i1 && (tile_range(g, i0, i1, e, &u0, &u1), u0 == *t0 && u1 == *t1)) ++e;
  return stack_size(e - b, nbmax);
}

// weight (nt, cout, C, kh, kw) -> wt (nt, K, cp): K in (kh, kw, C) order, channels zero-padded
// to cp; rows (t, q) split among the threads of the enclosing parallel region (then a barrier).
inline void pack_fwd_weight(const Geo& g, const float* weight, float* wt) {
  const int64_t k = g.k(), khw = g.kh * g.kw;
#pragma omp for schedule(static)
  for (int64_t tc = 0; tc < g.nt * g.c; ++tc) {  // weight[t, :, c] (cout, kh*kw) -> rows ij*C + c
    const int64_t t = tc / g.c, c = tc % g.c;
    float* dst = wt + (t * k + c) * g.cp;
    transpose(weight + (t * g.cout * g.c + c) * khw, g.cout, khw, g.c * khw, dst, g.c * g.cp);
    if (g.cp != g.cout)
      for (int64_t ij = 0; ij < khw; ++ij) std::fill(dst + ij * g.c * g.cp + g.cout, dst + ij * g.c * g.cp + g.cp, 0.f);
  }
}

// weight (nt, cout, C, kh, kw) -> w2 (nt, cout, kp): each row in (kh, kw, C) order, zero-padded
// to kp; rows split among the threads of the enclosing parallel region (then a barrier).
inline void pack_bwd_weight(const Geo& g, const float* weight, float* w2) {
  const int64_t khw = g.kh * g.kw;
#pragma omp for schedule(static)
  for (int64_t row = 0; row < g.nt * g.cout; ++row) {
    float* dst = w2 + row * g.kp;
    transpose(weight + row * g.c * khw, g.c, khw, khw, dst, g.c);  // (C, kh*kw) -> (kh*kw, C)
    std::fill(dst + khw * g.c, dst + g.kp, 0.f);
  }
}

// The part of a pixel's kernel window that reads the image, not its zero padding: kernel rows
// [ilo, ihi) and columns [jlo, jhi) (all 0 when none). The patch entries outside it multiply
// zeros, so the kernels skip them, as oneDNN's direct convolutions do: for the paper's conv2
// (16x16, 5x5, padding 2) 14% of the multiply-adds, conv1 (32x32) 7%.
struct Win {
  int64_t ilo, ihi, jlo, jhi;
  bool empty() const { return ilo >= ihi; }
};

// The kernel offsets i in [0, k) whose input o*s + i*d - pad lies in [0, n).
inline void valid_offsets(int64_t o, int64_t s, int64_t d, int64_t k, int64_t pad, int64_t n, int64_t* lo,
                          int64_t* hi) {
  int64_t a = 0, b = k;
  while (a < k && o * s + a * d < pad) ++a;
  while (b > a && o * s + (b - 1) * d >= pad + n) --b;
  *lo = a, *hi = b;
}

// The union (bounding window) of the windows of n pixels.
inline Win union_window(const Win* win, const int64_t* pix, int64_t n) {
  Win u{0, 0, 0, 0};
  for (int64_t r = 0; r < n; ++r) {
    const Win& w = win[pix[r]];
    if (w.empty()) continue;
    if (u.empty()) {
      u = w;
      continue;
    }
    u.ilo = std::min(u.ilo, w.ilo), u.ihi = std::max(u.ihi, w.ihi);
    u.jlo = std::min(u.jlo, w.jlo), u.jhi = std::max(u.jhi, w.jhi);
  }
  return u;
}

// The patch entries of window w, K in (kh, kw, C) order, as runs (pairs q0, q1; adjacent runs
// merged, so a whole window is one run); how many.
inline int64_t window_runs(const Geo& g, const Win& w, int64_t* runs) {
  int64_t n = 0;
  for (int64_t i = w.ilo; i < w.ihi; ++i) {
    const int64_t q0 = (i * g.kw + w.jlo) * g.c, q1 = (i * g.kw + w.jhi) * g.c;
    if (n && runs[2 * n - 1] == q0) runs[2 * n - 1] = q1;
    else runs[2 * n] = q0, runs[2 * n + 1] = q1, ++n;
  }
  return n;
}

// One axis of the output (its rows, or its columns): each output's kernel offsets that read
// the image, [lo, hi) (valid_offsets); its class (outputs with the same offsets share one,
// numbered in order of their first output); how many classes; and, once ranges() has run,
// for each kernel offset i the classes that read it, [va[i], vb[i]): a contiguous range, as
// the offsets move monotonically along the axis.
struct Axis {
  std::vector<int64_t> lo, hi, cls, va, vb;
  int64_t n = 0;
  Axis() = default;
  Axis(int64_t outs, int64_t s, int64_t d, int64_t k, int64_t pad, int64_t size) : lo(outs), hi(outs), cls(outs) {
    for (int64_t o = 0; o < outs; ++o) {
      valid_offsets(o, s, d, k, pad, size, &lo[o], &hi[o]);
      int64_t c = 0;
      while (c < o && !(lo[c] == lo[o] && hi[c] == hi[o])) ++c;
      cls[o] = c < o ? cls[c] : n++;
    }
  }
  // the offsets that read the image, summed over the outputs
  int64_t reads() const {
    int64_t sum = 0;
    for (std::size_t o = 0; o < lo.size(); ++o) sum += std::max<int64_t>(hi[o] - lo[o], 0);
    return sum;
  }
  // every output one class reading all k offsets
  void whole(int64_t k) {
    std::fill(lo.begin(), lo.end(), 0), std::fill(hi.begin(), hi.end(), k), std::fill(cls.begin(), cls.end(), 0);
    n = 1;
  }
  void ranges(int64_t k) {
    va.assign(k, n), vb.assign(k, 0);
    for (std::size_t o = 0; o < lo.size(); ++o)
      for (int64_t i = lo[o]; i < hi[o]; ++i) va[i] = std::min(va[i], cls[o]), vb[i] = std::max(vb[i], cls[o] + 1);
  }
};

// A row block of the input gradient: rows [r0, r0 + rn) of a chunk, their window, and the
// vectors of a kernel row it covers, [v0, v0 + nv), in nb blocks (the first rem of q + 1).
struct XBlock {
  int64_t r0, rn;
  Win u;
  int64_t v0, nv, nb, q, rem;
};

struct Scratch {  // per-thread buffers, kept between calls (OpenMP threads persist)
  std::vector<int64_t> pix, base, pbase, koff;
  std::vector<int64_t> row, pix2, base2, row2, cls, cend;  // output rows; sorting a group by window class
  std::vector<int64_t> runs, rng;  // a block's runs of patch entries, an entry block's pixel ranges
  std::vector<XBlock> xblocks;     // the input gradient's row blocks of a chunk
  std::vector<Win> win;        // each pixel's window
  Axis ry, cx;                 // the output's rows and columns (class = row class * cx.n + column class)
  bool whole = true;           // one class: every pixel computes its whole window
  // each patch entry q (K order): its kernel row, and the column classes valid for its column
  std::vector<int64_t> qi, qa, qb;
  int64_t last[6] = {-1, -1, -1, -1, -1, 0};  // entry_ranges' last question and answer
  Geo last_geo{};  // the geometry of the tables (batch, threads and layout zeroed)
  fvec G, T, gw, gb;
  fvec img_x, img_g, img_o;  // one image's (padded) input, output gradient, output
  fvec packed;  // the calling thread's: a call's weights packed for the team

  // Room for one group's pixels and patch offsets, the pixel offsets of this geometry, and
  // each pixel's window and class (pixels with the same window; rows of classes in row-major
  // order of their first pixel).
  void prepare(const Geo& g) {
    // the tables depend on the geometry but not on the batch, the threads or the layouts: kept
    // from the last call when it had the same
    Geo key = g;
    key.n = key.nth = key.layout = 0;
    if (std::memcmp(&key, &last_geo, sizeof key) == 0) return;
    last_geo = key;
    for (auto* v : {&pix, &base, &row, &pix2, &base2, &row2}) v->resize(g.m);
    pixel_bases(g, pbase);
    ry = Axis(g.oh, g.sh, g.dh, g.kh, g.ph, g.h), cx = Axis(g.ow, g.sw, g.dw, g.kw, g.pw, g.w);
    // Skipping pays only where enough of the work is padding: it sorts a group's pixels and
    // splits them into smaller blocks (Scratch::class_blocks). Below SKIP_MIN of the multiply-adds
    // every pixel counts as one class with the whole window (the paper's conv1, 7%: 9-14%
    // slower with skipping; conv2, 14%: 5-6% faster).
    constexpr double SKIP_MIN = 0.1;
    const double area = double(ry.reads()) * double(cx.reads());  // the window areas, summed
    if (1 - area / (double(g.np()) * g.kh * g.kw) < SKIP_MIN) ry.whole(g.kh), cx.whole(g.kw);
    const int64_t ncls = ry.n * cx.n;
    whole = ncls == 1;
    win.resize(g.np()), cls.resize(g.np()), cend.resize(ncls);
    runs.resize(2 * g.kh), rng.resize(2 * ncls);
    ry.ranges(g.kh), cx.ranges(g.kw);
    qi.resize(g.k()), qa.resize(g.k()), qb.resize(g.k());
    for (int64_t i = 0, q = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j)
        for (int64_t c = 0; c < g.c; ++c, ++q) qi[q] = i, qa[q] = cx.va[j], qb[q] = cx.vb[j];
    for (int64_t oy = 0, p = 0; oy < g.oh; ++oy)
      for (int64_t ox = 0; ox < g.ow; ++ox, ++p) {
        Win w{ry.lo[oy], ry.hi[oy], cx.lo[ox], cx.hi[ox]};
        if (w.ilo >= w.ihi || w.jlo >= w.jhi) w = Win{0, 0, 0, 0};  // every entry in the padding
        win[p] = w, cls[p] = ry.cls[oy] * cx.n + cx.cls[ox];
      }
  }
  // The valid pixels of tile t in images b..b+nb into pix (each one's pixel in its image),
  // base (its patch's offset in nb padded images of `stride` floats, stacked) and row (its row
  // in the images' stacked outputs, (b' - b) * np + pixel), in order of their window class
  // (stable: image by image, the drawn order within an image), and cend[c] the end of class
  // c's range; how many there are.
  int64_t group_of(const Geo& g, const int64_t* index, int64_t b, int64_t nb, int64_t t, int64_t stride = 0) {
    if (int64_t(pix.size()) < nb * g.m)
      for (auto* v : {&pix, &base, &row, &pix2, &base2, &row2}) v->resize(nb * g.m);
    int64_t cnt = 0;
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t n = group(g, index, pbase.data(), b + i, t, pix.data() + cnt, base.data() + cnt);
      for (int64_t r = cnt; r < cnt + n; ++r) base[r] += i * stride, row[r] = i * g.np() + pix[r];
      cnt += n;
    }
    const int64_t ncls = cend.size();
    last[0] = -1;  // new class ranges
    if (ncls == 1) return cend[0] = cnt;
    std::fill(cend.begin(), cend.end(), 0);
    for (int64_t r = 0; r < cnt; ++r) ++cend[cls[pix[r]]];
    for (int64_t c = 0, at = 0; c < ncls; ++c) at += cend[c], cend[c] = at - cend[c];  // starts
    for (int64_t r = 0; r < cnt; ++r) {
      const int64_t at = cend[cls[pix[r]]]++;
      pix2[at] = pix[r], base2[at] = base[r], row2[at] = row[r];
    }
    pix.swap(pix2), base.swap(base2), row.swap(row2);
    return cnt;
  }
  // The pixels among rows [r0, r0 + rc) of the sorted group for which some of the entries
  // [e0, e0 + mk) of patch segment s lie in their window, as ranges (pairs, relative to r0,
  // adjacent ones merged) into rng; how many.
  // q0: the first entry's index in K; consecutive calls with the same answer reuse it.
  int64_t entry_ranges(int64_t q0, int64_t mk, int64_t r0, int64_t rc) {
    const int64_t q1 = q0 + mk - 1, i = qi[q0];
    const int64_t ca = std::min(qa[q0], qa[q1]), cb = std::max(qb[q0], qb[q1]);
    if (i == last[0] && ca == last[1] && cb == last[2] && r0 == last[3] && rc == last[4]) return last[5];
    int64_t n = 0;
    for (int64_t rcl = ry.va[i]; rcl < ry.vb[i] && ca < cb; ++rcl) {
      const int64_t c0 = rcl * cx.n + ca, c1 = rcl * cx.n + cb - 1;
      const int64_t a = std::max(c0 ? cend[c0 - 1] : 0, r0) - r0, b = std::min(cend[c1], r0 + rc) - r0;
      if (a >= b) continue;
      if (n && rng[2 * n - 1] == a) rng[2 * n - 1] = b;
      else rng[2 * n] = a, rng[2 * n + 1] = b, ++n;
    }
    last[0] = i, last[1] = ca, last[2] = cb, last[3] = r0, last[4] = rc, last[5] = n;
    return n;
  }
  // Calls f(r0, rn) for blocks of at most mr consecutive pixels of the sorted group within
  // [lo, hi), each of one class where the class has at least minb pixels left (a smaller rest
  // goes on with the next class's pixels, the block then summing the union of their windows):
  // blocks of fewer than about 3 pixels run at half the speed, more than skipping saves.
  template <class F>
  void class_blocks(int64_t lo, int64_t hi, int64_t mr, int64_t minb, F&& f) const {
    int64_t b = lo;
    for (int64_t r = lo + 1; r < hi; ++r)
      if (r - b == mr || (r - b >= minb && cls[pix[r]] != cls[pix[r - 1]])) f(b, r - b), b = r;
    if (b < hi) f(b, hi - b);
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

// x: (N, H, W, C), or (N, C, H, W) when Geo::layout bit 0 is set; out: (N, oh, ow, cout), or
// (N, cout, oh, ow) likewise, written for every listed pixel (the caller zeroes it when some
// are not, and then sets layout bit 2). weight: (nt, cout, C, kh, kw), packed here into
// (nt, K, cp); bias: (nt, cout) or null. Each thread takes a contiguous range of the
// (image, tile) groups and pads each of its images into its own scratch (transposing an NCHW
// one). A channels-last output with whole vectors of channels is written in place, the rows
// of the next block prefetched; otherwise (NCHW, or cout not a multiple of the vector) an
// image's rows are gathered in scratch and transposed or copied into out, so neither layout
// costs a full-size copy.
int rapa_tiled_conv_fwd(const Geo* geo, const float* x, const float* weight, const float* bias_in,
                        const int64_t* index, float* out) {
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const Segs sg(g);
  const int64_t k = g.k(), np = g.np();
  const bool nchw = g.layout & 1, every = !(g.layout & 4), direct = !nchw && g.cp == g.cout;
  fvec& packed = scratch.packed;  // the calling thread's: shared by the team
  packed.resize(g.nt * k * g.cp + (bias_in ? g.nt * g.cp : 0));
  float* w = packed.data();
  float* bias = bias_in ? w + g.nt * k * g.cp : nullptr;  // (nt, cp)
  if (bias)
    for (int64_t t = 0; t < g.nt; ++t) {
      std::memcpy(bias + t * g.cp, bias_in + t * g.cout, g.cout * sizeof(float));
      std::fill(bias + t * g.cp + g.cout, bias + (t + 1) * g.cp, 0.f);
    }
#pragma omp parallel num_threads(g.nth)
  {
    pack_fwd_weight(g, weight, w);
    int64_t i0, i1;
    split(g.n * g.nt, omp_get_thread_num(), omp_get_num_threads(), &i0, &i1);
    Scratch& sc = scratch;
    sc.prepare(g);
    sc.koff.resize(k);
    for (int64_t q = 0; q < sg.nseg; ++q)
      for (int64_t e = 0; e < sg.len; ++e) sc.koff[q * sg.len + e] = sg.off[q] + e;
    const int64_t stride = g.hp * g.wp * g.c, nbmax = stack_max(g, sc.whole);  // one padded image; a stack
    sc.img_x.resize(nbmax * stride);
    if (!direct) sc.img_o.resize(nbmax * np * g.cp);
    const float* xp = sc.img_x.data();
    // SKIP: blocks by window class, each summing its window's runs only; else (sc.whole) blocks
    // of the group in order, each summing its whole patch as one run
    auto images = [&](auto SKIPc) {
    constexpr bool SKIP = decltype(SKIPc)::value;
    for (int64_t b = i0 / g.nt, nb; b * g.nt < i1; b += nb) {
      int64_t t0, t1;
      nb = next_stack(g, i0, i1, b, nbmax, &t0, &t1);
      for (int64_t i = 0; i < nb; ++i) pad_image(g, x, b + i, nchw, sc.img_x.data() + i * stride);
      // the stack's (nb * np, cp) rows: straight into out when it is channels-last with whole
      // vectors of channels, else gathered in scratch and copied (or transposed) below
      float* dst = direct ? out + b * np * g.cout : sc.img_o.data();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cnt = sc.group_of(g, index, b, nb, t, stride);
        for (int64_t c0 = 0; c0 < g.cp; c0 += NVMAX * VW) {
          const int64_t nv = std::min<int64_t>(NVMAX, (g.cp - c0) / VW);
          const float* bt = bias ? bias + t * g.cp + c0 : nullptr;
          const float* wt = w + t * k * g.cp + c0;
          dispatch<NVMAX>(nv, [&](auto NVc) {
            constexpr int NV = decltype(NVc)::value, MR = rows_for(NV);
            auto block = [&](int64_t r0, int64_t rn) {
              // the next block's output rows, scattered over images of out that are mostly
              // not in cache: asked for (to be written) while this block computes
              if (direct && c0 == 0)
                for (int64_t r = r0 + rn; r < std::min<int64_t>(cnt, r0 + rn + MR); ++r) prefetch_row(dst + sc.row[r] * g.cp, g.cout, true);
              dispatch<MR>(rn, [&](auto R) {
                constexpr int RN = decltype(R)::value;
                const int64_t whole[2] = {0, k};  // without skipping: the whole patch, one run
                int64_t* runs = sc.runs.data();
                const int64_t nruns = SKIP ? window_runs(g, union_window(sc.win.data(), sc.pix.data() + r0, RN), runs) : 1;
                fwd_block<RN, NV>(xp, sc.base.data() + r0, sc.koff.data(), SKIP ? runs : whole, nruns, wt, g.cp, bt,
                                  dst + c0, sc.row.data() + r0);
              });
            };
            if constexpr (SKIP) sc.class_blocks(0, cnt, MR, 3, block);
            else for (int64_t r0 = 0; r0 < cnt; r0 += MR) block(r0, std::min<int64_t>(MR, cnt - r0));
          });
        }
      }
      if (direct) continue;
      for (int64_t i = 0; i < nb; ++i) {
        float* ob = out + (b + i) * g.cout * np;  // (np, cout) or (cout, np)
        const float* di = dst + i * np * g.cp;    // its rows (np, cp)
        if (every && t0 == 0 && t1 == g.nt) {
          if (nchw) {
            transpose<true>(di, np, g.cout, g.cp, ob, np);
          } else {
            for (int64_t p = 0; p < np; ++p) std::memcpy(ob + p * g.cout, di + p * g.cp, g.cout * sizeof(float));
          }
          continue;
        }
        for (int64_t t = t0; t < t1; ++t) {  // part of the image, or not every pixel listed: only these pixels
          const int64_t cnt = sc.group_of(g, index, b + i, 1, t);
          for (int64_t r = 0; r < cnt; ++r) {
            const int64_t p = sc.pix[r];
            if (nchw) {
              for (int64_t c = 0; c < g.cout; ++c) ob[c * np + p] = di[p * g.cp + c];
            } else {
              std::memcpy(ob + p * g.cout, di + p * g.cp, g.cout * sizeof(float));
            }
          }
        }
      }
    }
    };
    if (sc.whole) images(std::false_type{});
    else images(std::true_type{});
  }
  return 0;
}

// gw (nt, cout, C, kh, kw) and gb (nt, cout): the weight and bias gradients, either may be null
// (x is only read for gw). x as in the forward; grad (N, oh, ow, cout), or (N, cout, oh, ow)
// when Geo::layout bit 1 is set. When the threads can share the tiles evenly, each thread sums
// whole tiles over every image (in image order: the same bits for any such thread count) and
// writes them; otherwise each sums its range of (image, tile) groups into partials that, after
// a barrier, the threads add up in thread order (deterministic for a thread count). Sharing
// the tiles has every thread read every image: with an NCHW gradient each thread transposes
// every image's gradient, and where those copies outweigh the partials (the gradient more
// than twice their size; the paper's conv1 at batch 128: its weight gradient 13% faster) the
// threads split the images instead.
int rapa_tiled_conv_bwd_w(const Geo* geo, const float* x, const float* grad, const int64_t* index,
                          float* gw, float* gb) {
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const Segs sg(g);
  const int64_t k = g.k(), khw = g.kh * g.kw;
  const bool nchw = g.layout & 1;
  std::vector<float*> part_w(g.nth), part_b(g.nth);
#pragma omp parallel num_threads(g.nth)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t dup = (g.layout & 2) ? (nth - 1) * g.n * g.np() * g.cout : 0;  // floats transposed again
    const bool by_tile = g.nt % nth == 0 && dup <= 2 * nth * g.nt * (g.k() + 1) * g.cp;
    int64_t tt0 = 0, tt1 = g.nt;  // the tiles of this thread's sums
    if (by_tile) split(g.nt, tid, nth, &tt0, &tt1);
    Scratch& sc = scratch;
    sc.prepare(g);
    sc.G.resize(PB * g.cp);
    const int64_t stride = g.hp * g.wp * g.c, nbmax = stack_max(g, sc.whole);  // one padded image; a stack
    if (gw) sc.img_x.resize(nbmax * stride);
    const float* xp = sc.img_x.data();
    if (gw) sc.gw.assign((tt1 - tt0) * k * g.cp, 0.f), part_w[tid] = sc.gw.data();
    if (gb) sc.gb.assign((tt1 - tt0) * g.cp, 0.f), part_b[tid] = sc.gb.data();
    auto stack = [&](int64_t b, int64_t nb, int64_t t0, int64_t t1) {  // groups (b..b+nb, t0..t1) into the sums
      if (gw)
        for (int64_t i = 0; i < nb; ++i) pad_image(g, x, b + i, nchw, sc.img_x.data() + i * stride);
      const float* gimg = grad_rows(g, grad, b, nb, sc.img_g);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t cnt = sc.group_of(g, index, b, nb, t, stride);
        for (int64_t r0 = 0; r0 < cnt; r0 += PB) {
          const int64_t rc = std::min(PB, cnt - r0);
          const int64_t* base = sc.base.data() + r0;
          float* G = sc.G.data();
          pack_g(g, gimg, sc.row.data() + r0, rc, G);
          if (gb) {
            float* gbt = sc.gb.data() + (t - tt0) * g.cp;
            for (int64_t r = 0; r < rc; ++r)
              for (int64_t j = 0; j < g.cout; ++j) gbt[j] += G[r * g.cp + j];
          }
          if (!gw) continue;
          float* gwt = sc.gw.data() + (t - tt0) * k * g.cp;
          for (int64_t c0 = 0; c0 < g.cp; c0 += NVMAX * VW) {
            const int64_t nv = std::min<int64_t>(NVMAX, (g.cp - c0) / VW);
            dispatch<NVMAX>(nv, [&](auto NVc) {
              constexpr int NV = decltype(NVc)::value, MK = krows_for(NV);
              for (int64_t s = 0; s < sg.nseg; ++s) {
                for (int64_t e0 = 0; e0 < sg.len; e0 += MK) {
                  const int64_t mk = std::min<int64_t>(MK, sg.len - e0);
                  // the pixels whose window holds some of these entries (all: one range)
                  const int64_t nrng = sc.whole ? (sc.rng[0] = 0, sc.rng[1] = rc, 1) : sc.entry_ranges(s * sg.len + e0, mk, r0, rc);
                  if (!nrng) continue;
                  dispatch<MK>(mk, [&](auto J) {
                    gw_block<decltype(J)::value, NV>(xp, base, sg.off[s] + e0, G + c0, g.cp, sc.rng.data(), nrng,
                                                     gwt + (s * sg.len + e0) * g.cp + c0);
                  });
                }
              }
            });
          }
        }
      }
    };
    int64_t i0, i1;
    if (by_tile) {
      for (int64_t b = 0, nb; b < g.n; b += nb) stack(b, nb = stack_size(g.n - b, nbmax), tt0, tt1);
    } else {
      split(g.n * g.nt, tid, nth, &i0, &i1);
      for (int64_t b = i0 / g.nt, nb; b * g.nt < i1; b += nb) {
        int64_t t0, t1;
        nb = next_stack(g, i0, i1, b, nbmax, &t0, &t1);
        stack(b, nb, t0, t1);
      }
#pragma omp barrier
    }
    // the sums' rows (t, q), K entries in (kh, kw, C) order -> gw[t, n, c, i, j]: this thread's
    // own tiles, or its share of the (t, c) rows summed over every thread's partials. The kh*kw
    // rows of one (t, c) (far apart: q = ij*C + c) are summed into a small block first, which
    // is then written to gw in order
    const int64_t nparts = by_tile ? 1 : nth;
    float* const* pw = by_tile ? &part_w[tid] : part_w.data();
    float* const* pb = by_tile ? &part_b[tid] : part_b.data();
    if (gw) {
      if (by_tile) i0 = tt0 * g.c, i1 = tt1 * g.c;
      else split(g.nt * g.c, tid, nth, &i0, &i1);
      sc.T.resize(khw * g.cp);
      float* blk = sc.T.data();  // (kh*kw, cp)
      for (int64_t tc = i0; tc < i1; ++tc) {
        const int64_t t = tc / g.c, c = tc % g.c;
        for (int64_t ij = 0; ij < khw; ++ij) {
          const int64_t src = ((t - tt0) * k + ij * g.c + c) * g.cp;  // row (t, q = ij*C + c)
          float* dst = blk + ij * g.cp;
          for (int64_t v = 0; v < g.cp; v += VW) {
            vf acc = vload(pw[0] + src + v);
            for (int64_t j = 1; j < nparts; ++j) acc += vload(pw[j] + src + v);
            vstore(dst + v, acc);
          }
        }
        transpose(blk, khw, g.cout, g.cp, gw + (t * g.cout * g.c + c) * khw, g.c * khw);  // -> gw[t, :, c]
      }
    }
    if (gb) {
      if (by_tile) i0 = tt0 * g.cout, i1 = tt1 * g.cout;
      else split(g.nt * g.cout, tid, nth, &i0, &i1);
      const int64_t off = by_tile ? tt0 : 0;
      for (int64_t e = i0; e < i1; ++e) {
        float acc = 0.f;
        for (int64_t j = 0; j < nparts; ++j) acc += pb[j][(e / g.cout - off) * g.cp + e % g.cout];
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

// gx: every listed pixel's patch gradient summed over its window, in x's layout (Geo::layout
// bit 0); grad as in rapa_tiled_conv_bwd_w. weight: (nt, cout, C, kh, kw), packed here into
// w2 (nt, cout, kp), K in (kh, kw, C) order and zero-padded. Work is split by images (windows overlap within an image); each thread
// accumulates an image's padded gradient in its scratch and copies (or transposes) its inside out.
int rapa_tiled_conv_bwd_x(const Geo* geo, const float* grad, const float* weight, const int64_t* index,
                          float* gx) {
  const Geo g = *geo;  // a local copy: the compiler knows that no store reaches it
  const Segs sg(g);
  const bool nchw = g.layout & 1;
  constexpr int MR = RAPA_GX_MR, SVMAX = RAPA_GX_SV;
  fvec& packed = scratch.packed;  // the calling thread's: shared by the team
  packed.resize(g.nt * g.cout * g.kp);
  const float* w2 = packed.data();
  const bool fused = sg.len % VW == 0;  // each segment whole vectors: no patch-gradient buffer
#pragma omp parallel num_threads(g.nth)
  {
    pack_bwd_weight(g, weight, packed.data());
    int64_t b0, b1;
    split(g.n, omp_get_thread_num(), omp_get_num_threads(), &b0, &b1);
    Scratch& sc = scratch;
    sc.prepare(g);
    sc.G.resize(PBX * g.cp), sc.T.resize(PBX * g.kp);
    float* T = sc.T.data();
    const int64_t row = g.wp * g.c, inner = g.w * g.c, hw = g.h * g.w;
    const int64_t stride = g.hp * row, nbmax = stack_max(g, sc.whole);  // one padded image; a stack
    sc.img_x.resize(nbmax * stride);
    float* img = sc.img_x.data();
    for (int64_t b = b0, nb; b < b1; b += nb) {
      nb = stack_size(b1 - b, nbmax);
      std::fill(img, img + nb * stride, 0.f);
      const float* gimg = grad_rows(g, grad, b, nb, sc.img_g);
      for (int64_t t = 0; t < g.nt; ++t) {
        const int64_t cnt = sc.group_of(g, index, b, nb, t, stride);
        const float* w2t = w2 + t * g.cout * g.kp;
        // chunks of PBX pixels: each block of SVMAX*VW patch entries of the weights (cout rows)
        // stays in L1 while every row block of the chunk uses it; T holds the chunk's patch
        // gradients (in L2) until they are added into their windows
        for (int64_t q0 = 0; q0 < cnt; q0 += PBX) {
          const int64_t qc = std::min(PBX, cnt - q0);
          float* G = sc.G.data();
          pack_g(g, gimg, sc.row.data() + q0, qc, G);
          if (fused) {  // segments of whole vectors: add each block of entries into the windows
            // Each row block's entries of segment s inside its window (whole vectors: the
            // rest falls in the padding, whose gradient is dropped), in nb blocks of nearly
            // equal size (10 = 5+5; with AVX2's 3 per block 3+3+2+2, not 3+3+3+1: a block of
            // one vector uses each broadcast once)
            const int64_t nvec = sg.len / VW;
            // the chunk's row blocks, each with its window and its vectors (of a kernel row)
            // in nb blocks: sizes q + 1 (the first rem) and q
            std::vector<XBlock>& xb = sc.xblocks;
            xb.clear();
            sc.class_blocks(q0, q0 + qc, MR, 2, [&](int64_t rq, int64_t rn) {
              XBlock x{rq - q0, rn, sc.whole ? Win{0, g.kh, 0, g.kw} : union_window(sc.win.data(), sc.pix.data() + rq, rn),
                       0, nvec, 0, 0, 0};
              if (g.dw == 1 && !x.u.empty()) x.v0 = x.u.jlo * g.c / VW, x.nv = (x.u.jhi * g.c + VW - 1) / VW - x.v0;
              x.nb = (x.nv + SVMAX - 1) / SVMAX, x.q = x.nv / std::max<int64_t>(x.nb, 1), x.rem = x.nv - x.q * x.nb;
              xb.push_back(x);
            });
            for (int64_t s = 0; s < sg.nseg; ++s) {
              const int64_t si = g.dw == 1 ? s : s / g.kw, sj = g.dw == 1 ? 0 : s % g.kw;
              for (const XBlock& x : xb) {
                const Win& u = x.u;
                const int64_t r0 = x.r0, rn = x.rn;
                if (u.empty() || si < u.ilo || si >= u.ihi || (g.dw != 1 && (sj < u.jlo || sj >= u.jhi))) continue;
                int64_t at[MR];
                for (int64_t j = 0, e = x.v0 * VW; j < x.nb; ++j) {
                  const int64_t sv = x.q + (j < x.rem);
                  for (int64_t r = 0; r < rn; ++r) at[r] = sc.base[q0 + r0 + r] + sg.off[s] + e;
                  dispatch<MR>(rn, [&](auto R) {
                    dispatch<SVMAX>(sv, [&](auto S) {
                      gx_block<decltype(R)::value, decltype(S)::value, true>(G + r0 * g.cp, g.cp, g.cout,
                                                                             w2t + s * sg.len + e, g.kp, img, at, 0);
                    });
                  });
                  e += sv * VW;
                }
              }
            }
            continue;
          }
          for (int64_t v0 = 0; v0 < g.kp / VW; v0 += SVMAX) {
            const int64_t sv = std::min<int64_t>(SVMAX, g.kp / VW - v0);
            for (int64_t r0 = 0; r0 < qc; r0 += MR) {
              dispatch<MR>(std::min<int64_t>(MR, qc - r0), [&](auto R) {
                dispatch<SVMAX>(sv, [&](auto S) {
                  gx_block<decltype(R)::value, decltype(S)::value, false>(G + r0 * g.cp, g.cp, g.cout,
                                                                          w2t + v0 * VW, g.kp,
                                                                          T + r0 * g.kp + v0 * VW, nullptr, g.kp);
                });
              });
            }
          }
          for (int64_t r = 0; r < qc; ++r) {  // add the patch gradients into the windows
            const float* src = T + r * g.kp;
            const int64_t at = sc.base[q0 + r];
            for (int64_t s = 0; s < sg.nseg; ++s) {
              float* dst = img + at + sg.off[s];
              const float* sr = src + s * sg.len;
              for (int64_t e = 0; e < sg.len; ++e) dst[e] += sr[e];
            }
          }
        }
      }
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t y = 0; y < g.h; ++y) {  // the images' gradients without the border
          const float* src = img + i * stride + (g.ph + y) * row + g.pw * g.c;
          if (nchw) transpose(src, g.w, g.c, g.c, gx + (b + i) * g.c * hw + y * g.w, hw);
          else std::memcpy(gx + ((b + i) * g.h + y) * inner, src, inner * sizeof(float));
        }
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

// Image b of x as (H*W, C) channels-last: x itself (NHWC) or its transpose in buf (NCHW).
inline const float* image_nhwc(const Geo& g, const float* x, int64_t b, bool nchw, fvec& buf) {
  const int64_t hw = g.h * g.w;
  if (!nchw) return x + b * hw * g.c;
  buf.resize(hw * g.c);
  transpose(x + b * g.c * hw, g.c, hw, hw, buf.data(), g.c);
  return buf.data();
}

// Image b of the output gradient (np, C) channels-last, likewise.
inline const float* grad_nhwc(const Geo& g, const float* grad, int64_t b, fvec& buf) {
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
int rapa_dw_fwd(const Geo* geo, const float* x, const float* w, const float* bias, const int64_t* index,
                float* out) {
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
int rapa_dw_bwd_w(const Geo* geo, const float* x, const float* grad, const int64_t* index, float* gw,
                  float* gb) {
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
    fvec pad;  // the image, zero-padded, channels-last
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
// gather: every input pixel written once).
int rapa_dw_bwd_x(const Geo* geo, const float* grad, const float* w, const int64_t* index, float* gx) {
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
