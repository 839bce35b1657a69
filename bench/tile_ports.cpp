// Where the 16-row Q4_1 batch tile's time goes: its inner loop (cpp/vecdot_avx2.cpp,
// tile32_pair512<Fmt4_1, 16>) on L1-resident data, and the same loop with one operation taken
// out at a time. What a variant saves is what that operation costs; the variants without the
// scale product or the int-to-float subtraction give wrong sums and exist only to be timed.
//
//     g++ -O3 -march=native -std=c++17 bench/tile_ports.cpp -o /tmp/tile_ports && /tmp/tile_ports
//
// Needs AVX512-VNNI and GFNI. Per block of 2 weight rows x 16 activation rows, llama.cpp's order
// asks for 16 dots (vpdpbusd), 16 int-to-float conversions, 16 scale products dw * da and 16
// FMAs, each a 512-bit uop on the two vector ports: 32 cycles before the block's own set-up.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

constexpr int kRows = 16, kBlocks = 18, kCols = kBlocks * 32;  // SmolLM2's 576 columns
alignas(64) int8_t g_acts[kRows * kCols];
alignas(64) float g_act_scales[kRows * kBlocks];
alignas(64) float g_act_magic[kRows * kBlocks];
alignas(64) uint8_t g_weights[2][kBlocks][20];  // two Q4_1 rows: f16 d, f16 m, 16 bytes of nibbles

enum Variant { kFull, kNoScaleProduct, kNoConvert, kNoActLoad, kConvertInstr, kFusedScale };

template <Variant V>
__attribute__((noinline)) void tile(float* out) {
    __m512 acc[kRows];
    for (auto& a : acc) a = _mm512_setzero_ps();
    const __m512i magic_bits = _mm512_set1_epi32(0x4b400000);  // 1.5 * 2^23
    const __m256i nibble_matrix = _mm256_setr_epi64x(0x0102040800000000ll, 0x0102040800000000ll,
                                                     0x1020408000000000ll, 0x1020408000000000ll);
    for (int b = 0; b < kBlocks; ++b) {
        const auto nibbles = [&](const uint8_t* q) {
            return _mm256_gf2p8affine_epi64_epi8(
                _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), nibble_matrix, 0);
        };
        const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles(g_weights[0][b] + 4)),
                                                 nibbles(g_weights[1][b] + 4), 1);
        int d0, d1;
        __builtin_memcpy(&d0, g_weights[0][b], 4);
        __builtin_memcpy(&d1, g_weights[1][b], 4);
        const __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(d0), d1, 1));
        const __m512 dw = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                                                _mm512_castps128_ps512(dm));
#pragma GCC unroll 16
        for (int i = 0; i < kRows; ++i) {
            const __m512i act = V == kNoActLoad
                                    ? _mm512_set1_epi32(i + b)
                                    : _mm512_broadcast_i64x4(_mm256_loadu_si256(
                                          reinterpret_cast<const __m256i*>(g_acts + i * kCols + b * 32)));
            __m512 lanes;
            if constexpr (V == kConvertInstr) {
                lanes = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, act));
            } else {
                const __m512i dot = _mm512_dpbusd_epi32(magic_bits, codes, act);
                lanes = V == kNoConvert || V == kFusedScale ? _mm512_castsi512_ps(dot)
                                        : _mm512_sub_ps(_mm512_castsi512_ps(dot), _mm512_set1_ps(12582912.0f));
            }
            if constexpr (V == kFusedScale) {
                const __m512 t = _mm512_fmsub_ps(lanes, _mm512_set1_ps(g_act_scales[i * kBlocks + b]),
                                                 _mm512_set1_ps(g_act_magic[i * kBlocks + b]));
                acc[i] = _mm512_fmadd_ps(dw, t, acc[i]);
                continue;
            }
            const __m512 scale =
                V == kNoScaleProduct ? dw : _mm512_mul_ps(dw, _mm512_set1_ps(g_act_scales[i * kBlocks + b]));
            acc[i] = _mm512_fmadd_ps(scale, lanes, acc[i]);
        }
    }
    for (int i = 0; i < kRows; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

template <Variant V>
void report(const char* name) {
    float out[kRows];
    constexpr int kReps = 2000000;
    for (int r = 0; r < 20000; ++r) tile<V>(out);
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < kReps; ++r) tile<V>(out);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-34s %5.1f ns a block (checksum %g)\n", name, s / kReps / kBlocks * 1e9, out[0]);
}

}  // namespace

int main() {
    for (int i = 0; i < kRows * kCols; ++i) g_acts[i] = static_cast<int8_t>(i * 7);
    // Scales that are f16 values, as the activation quantizers round them (d = fp16(amax / 127)).
    for (int i = 0; i < kRows * kBlocks; ++i)
        g_act_scales[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph(_mm_set_ss(0.001f * static_cast<float>(i % 13 + 1)), 0)));
    for (int i = 0; i < kRows * kBlocks; ++i) g_act_magic[i] = g_act_scales[i] * 12582912.0f;
    for (auto& row : g_weights)
        for (int b = 0; b < kBlocks; ++b) {
            for (int k = 0; k < 20; ++k) row[b][k] = static_cast<uint8_t>(k * 13 + b);
            row[b][1] = row[b][3] = 0x1c;  // small finite f16 d and m
        }
    for (int round = 0; round < 2; ++round) {
        report<kFull>("as the kernel");
        report<kNoScaleProduct>("without the scale product");
        report<kNoConvert>("without the int-to-float subtract");
        report<kNoActLoad>("without the activation loads");
        report<kConvertInstr>("vcvtdq2ps instead of the subtract");
        report<kFusedScale>("fmsub(F, da, magic da), fma(dw, .)");
    }
}
