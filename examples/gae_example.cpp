// GAE from C++ without PyTorch: link only the plain CPU kernels.
//
//   g++ -O2 -std=c++17 -pthread -Icsrc/include -Icsrc/cpu
//       examples/gae_example.cpp csrc/cpu/advantages.cpp csrc/cpu/parallel.cpp -o gae_example
//
// Two responses of four tokens, [B, T] = [2, 4] row-major. The first has a
// tool-output span (mask 0 at t = 1, 2) that neither adds a TD error nor
// decays the credit; the second is left-padded. Prints the advantages and
// the returns, one row per line.
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "rlhf_engine/advantages.h"

int main() {
  constexpr int64_t B = 2, T = 4;
  const float rewards[B * T] = {0.0f, 9.0f, 9.0f, 1.0f,   //
                                5.0f, 0.1f, -0.2f, 1.5f};
  const float values[B * T] = {0.5f, 7.0f, 7.0f, 0.25f,  //
                               3.0f, 0.4f, 0.3f, 0.6f};
  const uint8_t mask[B * T] = {1, 0, 0, 1,  //
                               0, 1, 1, 1};
  float advantages[B * T], returns[B * T];
  const int status = rlhf_gae_cpu(rewards, values, mask, B, T, /*gamma=*/0.99f, /*lam=*/0.95f, advantages, returns);
  if (status != 0) {
    std::fprintf(stderr, "rlhf_gae_cpu failed with status %d\n", status);
    return 1;
  }
  for (const float* out : {advantages, returns}) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T; ++t) std::printf("%s%.9g", t ? " " : "", out[b * T + t]);
      std::printf("\n");
    }
  }
  return 0;
}
