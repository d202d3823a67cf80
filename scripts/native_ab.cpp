// Two or more builds of the native CPU decode kernel, timed against each other: calls alternate between the
// builds on the same inputs, after the same cache flush, so that the machine's drift (2x over minutes on a shared
// VM) falls on every build alike. Each argument after the shape is a shared library built from a version of
// dsc/kernels/csrc/ds_decode_cpu.cpp with native.py's flags, e.g. the current source and `git show REV:...`:
//
//   F="-O3 -march=native -std=c++17 -fPIC -shared -fopenmp -fno-math-errno -fno-trapping-math -fno-signed-zeros
//      -fassociative-math"
//   c++ $F dsc/kernels/csrc/ds_decode_cpu.cpp -o /tmp/new.so
//   git show HEAD~3:dsc/kernels/csrc/ds_decode_cpu.cpp > /tmp/old.cpp && c++ $F /tmp/old.cpp -o /tmp/old.so
//   c++ -O2 scripts/native_ab.cpp -o /tmp/native_ab -ldl
//   /tmp/native_ab 8 15 4 8 4 128 65536 /tmp/old.so /tmp/new.so   # bits calls B Hkv G D S libs...
//
// Group selection, r = D/4 label channels, 1/16 of the row (no sink/recent), one thread, fp32 K/V; 16-bit labels
// are fp32 copies of the keys' channels, 8- and 4-bit ones codes with a per-token scale and zero. Prints each build's
// median ms per call.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// Tensors' alignment: PyTorch's CPU allocator returns 64-byte aligned memory, so every K/V row of 64-byte multiples
// starts a cache line; malloc's 16-byte alignment would make each row straddle one line more than it fills.
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned64&) const { return true; }
};
template <class T>
using Buffer = std::vector<T, Aligned64<T>>;

using DsDecode = int (*)(const float*, int64_t, int64_t, const void*, const void*, int, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, const int64_t*, const void*, int, int64_t, int64_t, int64_t,
                         const float*, const float*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t, int, float,
                         float*, int, int64_t);

int main(int argc, char** argv) {
  if (argc < 9) {
    std::fprintf(stderr, "usage: %s bits(16|8|4) calls B Hkv G D S lib.so [lib.so ...]\n", argv[0]);
    return 2;
  }
  const int bits = std::atoi(argv[1]), calls = std::atoi(argv[2]);
  const int64_t B = std::atoll(argv[3]), Hkv = std::atoll(argv[4]), G = std::atoll(argv[5]), D = std::atoll(argv[6]),
                S = std::atoll(argv[7]);
  std::vector<DsDecode> builds;
  for (int i = 8; i < argc; ++i) {
    void* lib = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 1;
    }
    builds.push_back(reinterpret_cast<DsDecode>(dlsym(lib, "dsc_ds_decode")));
  }
  const int64_t r = D / 4, keep = S / 16, rows = B * Hkv * S;
  uint64_t state = 88172645463325252ull;  // xorshift: inputs in [-3, 3), no library RNG on the setup path
  auto uniform = [&] {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return static_cast<float>(state >> 40) / 16777216.f * 6.f - 3.f;
  };
  Buffer<float> K(rows * D), V(rows * D), q(B * Hkv * G * D), out(B * Hkv * G * D);
  for (auto* x : {&K, &V, &q})
    for (float& f : *x) f = uniform();
  std::vector<int64_t> channels(Hkv * r);
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t c = 0; c < r; ++c) channels[h * r + c] = (c * 7 + h) % D;
  const int levels = bits == 4 ? 15 : 255;
  const int64_t width = bits == 4 ? (r + 1) / 2 : r;  // code bytes per label (4-bit: two channels a byte)
  Buffer<float> labels(rows * r), scale(rows, 6.f / levels), zero(rows, -3.f);
  Buffer<uint8_t> codes(rows * width);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < r; ++c) {
      labels[i * r + c] = K[i * D + channels[(i / S % Hkv) * r + c]];
      const auto code = static_cast<uint8_t>((labels[i * r + c] + 3.f) * levels / 6);
      if (bits == 4) codes[i * width + c / 2] |= static_cast<uint8_t>(c % 2 ? code << 4 : code);
      else codes[i * r + c] = code;
    }
  std::vector<char> flush(1 << 30);  // more than any last-level cache here
  std::vector<std::vector<double>> ms(builds.size());
  for (int call = 0; call < calls; ++call)
    for (size_t b = 0; b < builds.size(); ++b) {
      std::memset(flush.data(), call, flush.size());
      const auto t0 = std::chrono::steady_clock::now();
      if (bits == 16)
        builds[b](q.data(), Hkv * G * D, D, K.data(), V.data(), 0, Hkv * S * D, S * D, D, Hkv * S * D, S * D, D,
                  channels.data(), labels.data(), 0, Hkv * S * r, S * r, r, nullptr, nullptr, 0, 0, nullptr, B, Hkv,
                  G, S, D, D, r, keep, keep, 0.0, 0, 0, 1, 1.f / 11.3f, out.data(), 1, -1);
      else
        builds[b](q.data(), Hkv * G * D, D, K.data(), V.data(), 0, Hkv * S * D, S * D, D, Hkv * S * D, S * D, D,
                  channels.data(), codes.data(), bits == 4 ? 4 : 3, Hkv * S * width, S * width, width, scale.data(),
                  zero.data(), Hkv * S, S,
                  nullptr, B, Hkv, G, S, D, D, r, keep, keep, 0.0, 0, 0, 1, 1.f / 11.3f, out.data(), 1, -1);
      ms[b].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  for (size_t b = 0; b < builds.size(); ++b) {
    std::sort(ms[b].begin(), ms[b].end());
    std::printf("%-40s median %.2f ms per call\n", argv[8 + b], ms[b][ms[b].size() / 2]);
  }
  return 0;
}
