// Rows of uniformly random permutations drawn exactly as torch.randperm draws them on the CPU,
// loaded by rapa/ops/native.py (rapa.schemes draws the `random` scheme's assignment with it).
//
// torch.randperm(n, generator=g) on the CPU (n < 2^32 / 20) is a forward Fisher-Yates shuffle:
// for i in [0, n-1): z = g.random() % (n - i), swap r[i] and r[i + z], where g.random() is the
// next 32-bit output of the generator's MT19937 engine. A training step draws one such
// permutation per image and layer; from Python that is one call per image (about 18 us each
// for n = 1024, most of it call overhead). Here the engine runs from the generator's own
// state (torch.Generator.get_state(), edited in place and set back by the caller), so b rows
// cost one call, give the same permutations and leave the generator where b calls of
// torch.randperm would. The caller checks the result against torch.randperm once per process
// (rapa.ops.native.randperm_rows) and otherwise draws with torch.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MT_N = 624, MT_M = 397;
// torch's CPU generator state as get_state() returns it (CPUGeneratorImplStateLegacy):
// uint64 seed, int32 left, int32 seeded, uint64 next, uint64 state[624], ...
constexpr int64_t OFF_LEFT = 8, OFF_NEXT = 16, OFF_STATE = 24, STATE_BYTES = OFF_STATE + 8 * MT_N;

struct Mt19937 {  // at::mt19937 (ATen/core/MT19937RNGEngine.h)
  uint32_t s[MT_N];
  int32_t left;
  uint32_t next;

  static uint32_t twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
  }
  void next_state() {
    uint32_t* p = s;
    left = MT_N, next = 0;
    for (int j = MT_N - MT_M + 1; --j; p++) *p = p[MT_M] ^ twist(p[0], p[1]);
    for (int j = MT_M; --j; p++) *p = p[MT_M - MT_N] ^ twist(p[0], p[1]);
    *p = p[MT_M - MT_N] ^ twist(p[0], s[0]);
  }
  // The next cnt outputs of at::mt19937's operator() into d (which counts `left` down and
  // refreshes the state when it reaches 0, then returns the tempered s[next++]): each state
  // block's values tempered in one (vectorised) loop, the engine left where cnt calls would
  // leave it.
  void fill(uint32_t* d, int64_t cnt) {
    for (;;) {
      const int64_t avail = std::min<int64_t>(left - 1, cnt);  // before the next refresh
      const uint32_t* src = s + next;
      for (int64_t j = 0; j < avail; ++j) {
        uint32_t y = src[j];
        y ^= (y >> 11);
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= (y >> 18);
        d[j] = y;
      }
      next += uint32_t(avail), left -= int32_t(avail), d += avail, cnt -= avail;
      if (cnt == 0) return;
      next_state();  // left was 1: the next call refreshes the state and draws s[0]
      left = MT_N + 1;  // without counting that draw down
    }
  }
};

// z[i] = d[i] % (n - i) for i < per (n < 2^32), as torch's int64 % gives it. Where n <= 2^20,
// eight at a time in doubles (exact: with d < 2^32 and a divisor m <= 2^20, a remainder r > 0
// puts d / m at least 1/m = 2^-20 below the next integer, more than half a double's spacing
// there (2^-22 at most), so the rounded quotient truncates to the integer quotient q; d - m*q
// is then an exact integer), a few times faster than integer division.
inline void mods(const uint32_t* d, int64_t per, int64_t n, uint32_t* z) {
  typedef double v8d __attribute__((vector_size(8 * sizeof(double))));
  typedef int64_t v8l __attribute__((vector_size(8 * sizeof(int64_t))));
  typedef uint32_t v8u __attribute__((vector_size(8 * sizeof(uint32_t))));
  int64_t i = 0;
  if (n <= (int64_t(1) << 20)) {
    const v8d step = {0, 1, 2, 3, 4, 5, 6, 7};
    for (; i + 8 <= per; i += 8) {
      v8u dv;
      std::memcpy(&dv, d + i, sizeof dv);
      const v8d dd = __builtin_convertvector(dv, v8d), m = double(n - i) - step;
      const v8d q = __builtin_convertvector(__builtin_convertvector(dd / m, v8l), v8d);  // truncated
      const v8u r = __builtin_convertvector(__builtin_convertvector(dd - m * q, v8l), v8u);
      std::memcpy(z + i, &r, sizeof r);
    }
  }
  for (; i < per; ++i) z[i] = d[i] % uint32_t(n - i);
}

}  // namespace

extern "C" {

// The bytes of torch's CPU generator state that this engine reads and writes.
int64_t rapa_generator_state_bytes() { return STATE_BYTES; }

// b permutations perm of range(n), drawn from the generator state `state` (at least
// rapa_generator_state_bytes() bytes), which is advanced past the b * (n - 1) draws, written
// to out (b, cols, M), M = ceil(n / cols), as out[row, c, j] = perm[row, j * cols + c] (n past
// the end of perm): the rank grid of a random balanced partition into `cols` tiles (cols = 1:
// the permutations as rows). The draws are made in order (tempered a state block at a time,
// vectorised); the shuffles run on nth OpenMP threads (one row each), their remainders
// computed in doubles (mods). Returns 0, or -1 (nothing written) if the state is not one this
// engine can read or n is out of torch.randperm's small-n range.
int rapa_randperm_rows(uint8_t* state, int64_t b, int64_t n, int64_t cols, int64_t nth, int64_t* out) {
  if (b < 0 || n < 1 || cols < 1 || n >= int64_t(UINT32_MAX / 20)) return -1;
  Mt19937 mt;
  uint64_t next;
  std::memcpy(&mt.left, state + OFF_LEFT, sizeof mt.left);
  std::memcpy(&next, state + OFF_NEXT, sizeof next);
  if (mt.left < 1 || mt.left > MT_N || next > uint64_t(MT_N)) return -1;
  mt.next = uint32_t(next);
  for (int i = 0; i < MT_N; ++i) {
    uint64_t v;
    std::memcpy(&v, state + OFF_STATE + 8 * i, sizeof v);
    mt.s[i] = uint32_t(v);
  }
  const int64_t per = n - 1;
  // the draws' buffer: kept between calls up to KEEP draws (fresh memory costs its zeroing
  // again at every call), a temporary one beyond
  constexpr int64_t KEEP = int64_t(1) << 22;
  thread_local std::vector<uint32_t> kept;
  std::vector<uint32_t> once;
  std::vector<uint32_t>& draws = b * per <= KEEP ? kept : once;
  if (int64_t(draws.size()) < b * per) draws.resize(b * per);
  mt.fill(draws.data(), b * per);
  const uint32_t* all = draws.data();  // (the team's threads have their own thread_locals)
  std::memcpy(state + OFF_LEFT, &mt.left, sizeof mt.left);
  next = mt.next;
  std::memcpy(state + OFF_NEXT, &next, sizeof next);
  for (int i = 0; i < MT_N; ++i) {
    const uint64_t v = mt.s[i];
    std::memcpy(state + OFF_STATE + 8 * i, &v, sizeof v);
  }
  const int64_t m = (n + cols - 1) / cols;
#pragma omp parallel num_threads(nth)
  {
    std::vector<int64_t> buf(cols == 1 ? 0 : n);
    std::vector<uint32_t> zs(per);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < b; ++row) {
      int64_t* r = cols == 1 ? out + row * n : buf.data();
      const uint32_t* d = all + row * per;
      for (int64_t i = 0; i < n; ++i) r[i] = i;
      uint32_t* z = zs.data();  // z[i] = d[i] % (n - i), the same as torch's int64 % (n < 2^32)
      mods(d, per, n, z);
      for (int64_t i = 0; i < per; ++i) {
        const int64_t save = r[i];
        r[i] = r[i + z[i]];
        r[i + z[i]] = save;
      }
      if (cols == 1) continue;
      int64_t* o = out + row * cols * m;
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t j = 0; j < m; ++j) o[c * m + j] = j * cols + c < n ? r[j * cols + c] : n;
    }
  }
  return 0;
}

}  // extern "C"
