// What one selected K/V row costs on this machine: the floor under the native kernel's attention phase.
//
// Double Sparsity reads 1/16 of the K/V rows, scattered; dense attention streams them all. The byte limit that
// `dsc bench attention` prints assumes a gathered byte costs what a streamed one does. This program measures both
// on cold memory (a 64 MB write before each run): a plain streaming read of K and V, and a bare read of m sorted
// random K and V rows per head (both prefetched 8 rows ahead, as the kernel does; no arithmetic to wait on), the
// least the kernel's attention phase can cost.
//
// A fifth argument chooses the pages K and V sit on: 1 = transparent huge pages (2 MB, advised before the first
// write), 0 = 4 KB pages (the default); run both, alternating, to see what the page walks cost.
//
//   c++ -O3 -march=native -ffast-math scripts/gather_floor.cpp -o /tmp/gather_floor
//   /tmp/gather_floor 16384 3 64 1024 [0|1]   # S, heads (batch x KV heads), head_dim, rows per head, huge pages
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <sys/mman.h>

// n floats, zero-filled, 2 MB-aligned, on huge pages or kept off them (advised before the first write).
static float* alloc_on_pages(size_t n, bool huge) {
  const size_t page = size_t(2) << 20, bytes = (n * sizeof(float) + page - 1) / page * page;
  float* p = static_cast<float*>(std::aligned_alloc(page, bytes));
  if (p == nullptr || madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) {
    std::fprintf(stderr, "allocation or madvise failed\n");
    std::exit(1);
  }
  std::fill(p, p + n, 1.f);
  return p;
}

static double median_ms(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::fprintf(stderr, "usage: %s S heads head_dim rows_per_head [huge_pages 0|1]\n", argv[0]);
    return 2;
  }
  const int S = std::atoi(argv[1]), H = std::atoi(argv[2]), D = std::atoi(argv[3]), m = std::atoi(argv[4]);
  const int ahead = 8;
  const size_t n = size_t(H) * S * D;
  const bool huge = argc == 6 && std::atoi(argv[5]) == 1;
  float* K = alloc_on_pages(n, huge);
  float* V = alloc_on_pages(n, huge);
  std::vector<char> junk(64 << 20);
  std::mt19937 rng(0);
  std::vector<std::vector<int>> picked(H);
  for (auto& p : picked) {
    std::vector<int> all(S);
    for (int i = 0; i < S; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    p.assign(all.begin(), all.begin() + m);
    std::sort(p.begin(), p.end());
  }
  std::vector<double> gather, stream;
  float sink = 0.f;
  float lanes[16] = {};  // independent sums: the loop waits on memory only
  for (int it = 0; it < 15; ++it) {
    std::memset(junk.data(), it, junk.size());
    auto t0 = std::chrono::steady_clock::now();
    for (int h = 0; h < H; ++h) {
      const float* kb = K + size_t(h) * S * D;
      const float* vb = V + size_t(h) * S * D;
      const int* p = picked[h].data();
      for (int j = 0; j < m; ++j) {
        if (j + ahead < m)
          for (int o = 0; o < D; o += 16) {
            __builtin_prefetch(kb + size_t(p[j + ahead]) * D + o);
            __builtin_prefetch(vb + size_t(p[j + ahead]) * D + o);
          }
        const float* kr = kb + size_t(p[j]) * D;
        const float* vr = vb + size_t(p[j]) * D;
        float row = 0.f;  // summed in registers (-ffast-math vectorises it): a sum through `lanes` in memory,
        for (int i = 0; i < D; ++i) row += kr[i] + vr[i];  // as before, doubled the time this loop took
        lanes[j % 16] += row;
      }
    }
    auto t1 = std::chrono::steady_clock::now();
    gather.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    std::memset(junk.data(), it + 1, junk.size());
    t0 = std::chrono::steady_clock::now();
    float acc = 0.f;
    for (size_t i = 0; i < n; ++i) acc += K[i] + V[i];
    sink += acc;
    t1 = std::chrono::steady_clock::now();
    stream.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  const double g = median_ms(gather), s = median_ms(stream);
  const double rows = 2.0 * H * m, row_bytes = D * 4.0;
  std::printf("S=%d heads=%d D=%d rows/head=%d (fp32), %s pages\n", S, H, D, m, huge ? "2 MB" : "4 KB");
  std::printf("  gather: %.3f ms, %.0f ns per %.0f B row, %.2f GB/s\n", g, g * 1e6 / rows, row_bytes,
              rows * row_bytes / g / 1e6);
  std::printf("  stream: %.3f ms for all %d rows, %.2f GB/s\n", s, 2 * H * S, 2.0 * n * 4 / s / 1e6);
  return (sink + lanes[0]) > 1e30f;
}
