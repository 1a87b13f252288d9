// Philox-4x32-10 keep-mask of the LoRA dropout, bit-identical to fused_lora.dropout.dropout_keep_mask:
// counter (column, row, 0, 0), key = the 64-bit seed as (low word, high word); an element is kept when
// the top 24 bits of the first output word are >= threshold = round(p * 2**24).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fused_lora_cpu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// Portable version: batches of 64 columns whose round loop the compiler may vectorise.
constexpr int kPhiloxBatch = 64;

inline void philox_keep_row_generic(uint32_t row, int64_t col0, int64_t n, uint32_t key0, uint32_t key1,
                                    uint32_t threshold, uint8_t* keep) {
  for (int64_t j0 = 0; j0 < n; j0 += kPhiloxBatch) {
    uint32_t c0[kPhiloxBatch], c1[kPhiloxBatch], c2[kPhiloxBatch], c3[kPhiloxBatch];
    for (int i = 0; i < kPhiloxBatch; ++i) {
      c0[i] = static_cast<uint32_t>(col0 + j0 + i);
      c1[i] = row;
      c2[i] = 0;
      c3[i] = 0;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int i = 0; i < kPhiloxBatch; ++i) {
        const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2[i];
        const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0[i];
        const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[i] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[i] ^ k1;
        c1[i] = static_cast<uint32_t>(pb);
        c3[i] = static_cast<uint32_t>(pa);
        c0[i] = n0;
        c2[i] = n2;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    const int count = static_cast<int>(std::min<int64_t>(kPhiloxBatch, n - j0));
    for (int i = 0; i < count; ++i) {
      keep[j0 + i] = static_cast<uint8_t>((c0[i] >> 8) >= threshold);
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FUSED_LORA_PHILOX_AVX2 1

// AVX2, 32 columns per step in four independent vectors; the 32 x 32 -> 64 products are vpmuludq on
// even / odd lanes with blends. 1M mask elements on one core of an AMD EPYC (AVX2, GCC 12 -O3): the
// portable loop above, auto-vectorised, 7.0 ms; this with all 20 products 3.9 ms; with 17 (below) 3.25 ms.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline void philox_keep_row_avx2(uint32_t row, int64_t col0, int64_t n,
                                                                  uint32_t key0, uint32_t key1,
                                                                  uint32_t threshold, uint8_t* keep) {
  constexpr int V = 4;
  const __m256i mA = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mB = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));  // <= 2**24: signed compare is exact
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i one = _mm256_set1_epi8(1);
  alignas(32) uint8_t tail[32];
  for (int64_t j0 = 0; j0 < n; j0 += 8 * V) {
    // Round 1 has c2 = c3 = 0, so c0 becomes row ^ key0 for every column and c1 = 0; round 2's product
    // of that c0 is one scalar; round 10 needs only the first word. 17 vector products instead of 20.
    const uint32_t c0_r1 = row ^ key0;
    const uint64_t p_r2 = static_cast<uint64_t>(kPhiloxRoundA) * c0_r1;
    const uint32_t k0_r2 = key0 + kPhiloxKeyA, k1_r2 = key1 + kPhiloxKeyB;
    const __m256i hi_r2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p_r2 >> 32) ^ k1_r2));
    const __m256i lo_r2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p_r2)));
    const __m256i vk0_r2 = _mm256_set1_epi32(static_cast<int>(k0_r2));
    const __m256i vk1_r1 = _mm256_set1_epi32(static_cast<int>(key1));
    __m256i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      const __m256i col = _mm256_add_epi32(
          _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(col0 + j0 + 8 * v))), lane);
      __m256i ha, la;
      mulhilo8(col, mA, ha, la);  // round 1
      const __m256i c2_r1 = _mm256_xor_si256(ha, vk1_r1), c3_r1 = la;
      __m256i hb, lb;
      mulhilo8(c2_r1, mB, hb, lb);  // round 2
      c0[v] = _mm256_xor_si256(hb, vk0_r2);
      c1[v] = lb;
      c2[v] = _mm256_xor_si256(hi_r2, c3_r1);
      c3[v] = lo_r2;
    }
    uint32_t k0 = k0_r2 + kPhiloxKeyA, k1 = k1_r2 + kPhiloxKeyB;
    for (int round = 2; round < kPhiloxRounds - 1; ++round) {
      const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0)), vk1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < V; ++v) {
        __m256i hb, lb, ha, la;
        mulhilo8(c2[v], mB, hb, lb);
        mulhilo8(c0[v], mA, ha, la);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hb, c1[v]), vk0);
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(ha, c3[v]), vk1);
        c1[v] = lb;
        c3[v] = la;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    {
      const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
      for (int v = 0; v < V; ++v) {  // round 10: the first word only
        const __m256i even = _mm256_mul_epu32(c2[v], mB);
        const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c2[v], 32), mB);
        const __m256i hb = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hb, c1[v]), vk0);
      }
    }
    __m256i drop[V];  // -1 where (c0 >> 8) < threshold
    for (int v = 0; v < V; ++v) drop[v] = _mm256_cmpgt_epi32(thr, _mm256_srli_epi32(c0[v], 8));
    // Bytes in column order: packs interleave 128-bit lanes, the permute undoes it.
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(drop[0], drop[1]), _mm256_packs_epi32(drop[2], drop[3])), order);
    const __m256i kept = _mm256_add_epi8(bytes, one);  // drop (-1) -> 0, keep (0) -> 1
    if (n - j0 >= 8 * V) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + j0), kept);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail), kept);
      std::memcpy(keep + j0, tail, static_cast<size_t>(n - j0));
    }
  }
}
#endif

// keep[j] = 1 if element (row, col0 + j) is kept, else 0, for j in [0, n).
inline void philox_keep_row(uint32_t row, int64_t col0, int64_t n, uint32_t key0, uint32_t key1,
                            uint32_t threshold, uint8_t* keep) {
#ifdef FUSED_LORA_PHILOX_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    philox_keep_row_avx2(row, col0, n, key0, key1, threshold, keep);
    return;
  }
#endif
  philox_keep_row_generic(row, col0, n, key0, key1, threshold, keep);
}

}  // namespace fused_lora_cpu
