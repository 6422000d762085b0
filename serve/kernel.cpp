// y = x @ w.T (times a per-output scale for int8 weights), computed so that each output element
// depends only on its own row of x: every element sums its products in one order, fixed by K alone
// (8 lanes of every 8th product, then a fixed tree), whatever the number of rows or how they are
// tiled. BLAS libraries pick kernels by the number of rows, so a row's last bits there depend on the
// rows computed beside it, and sampled text on the requests batched with it.
// Built with -ffp-contract=off, so the compiler fuses no a * b + c on its own: multiply_add decides, the
// same way in every tile shape.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>
#if defined(__AVX2__) || defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef float f8 __attribute__((vector_size(32)));

static inline f8 load(const float* p) {
    f8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// The int8 server's KV cache holds IEEE half floats (see serve/kernel.py). F16C converts them where the CPU
// has it (every AVX2 CPU; the bits are kept as uint16_t, so compilers without _Float16 on x86, such as g++ 11,
// build this too); elsewhere the compiler's _Float16 does. Both round to nearest even, as torch does.
#ifdef __F16C__
typedef uint16_t half;
static inline float widen(half h) { return _cvtsh_ss(h); }
static inline half narrow(float x, half*) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
static inline f8 load(const half* p) {
    return reinterpret_cast<f8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
typedef _Float16 half;
static inline float widen(half h) { return static_cast<float>(h); }
static inline half narrow(float x, half*) { return static_cast<half>(x); }
static inline f8 load(const half* p) {
    f8 v;
    for (int lane = 0; lane < 8; lane++) v[lane] = widen(p[lane]);
    return v;
}
#endif
// widen: a cache element as a float; narrow: a float as an element of the cache the pointer points into.
static inline float widen(float x) { return x; }
static inline float narrow(float x, float*) { return x; }

// a * b + c, rounded once where the CPU has FMA (then everywhere in this file), else twice.
static inline f8 multiply_add(f8 a, f8 b, f8 c) {
#ifdef __FMA__
    return reinterpret_cast<f8>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                reinterpret_cast<__m256>(c)));
#else
    return a * b + c;
#endif
}

static inline float multiply_add(float a, float b, float c) {
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

// ROWS rows of x against COLS rows of w (float weights, or a KV cache's keys): each load of w serves ROWS rows.
template <typename W, int ROWS, int COLS>
static inline void tile(const float* x, const W* w, int64_t K, float* y, int64_t N) {
    f8 acc[ROWS][COLS] = {};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        f8 weights[COLS];
        for (int c = 0; c < COLS; c++) weights[c] = load(w + c * K + k);
        for (int r = 0; r < ROWS; r++) {
            f8 inputs = load(x + r * K + k);
            for (int c = 0; c < COLS; c++) acc[r][c] = multiply_add(inputs, weights[c], acc[r][c]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++) {
            f8 a = acc[r][c];
            for (int lane = 0; k + lane < K; lane++)
                a[lane] = multiply_add(x[r * K + k + lane], widen(w[c * K + k + lane]), a[lane]);
            y[r * N + c] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
        }
}

// The weight's arguments come first, so that Python can bind them once per layer.
extern "C" void linear_f32(const float* w, int64_t N, int64_t K, const float* x, float* y, int64_t B,
                           int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n += 4) {
        if (n + 4 <= N) {
            int64_t b = 0;
            for (; b + 4 <= B; b += 4) tile<float, 4, 4>(x + b * K, w + n * K, K, y + b * N + n, N);
            for (; b < B; b++) tile<float, 1, 4>(x + b * K, w + n * K, K, y + b * N + n, N);
        } else {
            for (int64_t c = n; c < N; c++)
                for (int64_t b = 0; b < B; b++) tile<float, 1, 1>(x + b * K, w + c * K, K, y + b * N + c, N);
        }
    }
}

// int8: each row of x is rounded to int8 with a scale of its own (its largest magnitude maps to 127), and
// the products with the int8 weights are summed in int32. Integer sums are exact, so their order cannot
// matter; the scales are applied per element. Nothing depends on the other rows.
// The rounded rows are held as int16 (AVX2 multiplies int16 pairs), made once for every projection of the
// same input (q, k and v; gate and up).
struct RoundedRows {
    std::vector<int16_t> values;
    std::vector<float> scales;
};

static RoundedRows round_rows(const float* x, int64_t B, int64_t K) {
    RoundedRows rounded{std::vector<int16_t>(B * K), std::vector<float>(B)};
    for (int64_t b = 0; b < B; b++) {
        const float* row = x + b * K;
        int16_t* out = &rounded.values[b * K];
        float largest = 0.0f;
        for (int64_t k = 0; k < K; k++) largest = std::max(largest, std::fabs(row[k]));
        rounded.scales[b] = largest / 127.0f;
        float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        int64_t k = 0;
#ifdef __AVX2__  // cvtps rounds to nearest even, as nearbyint does in the default rounding mode
        __m256 factor = _mm256_set1_ps(inverse);
        for (; k + 16 <= K; k += 16) {
            __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), factor));
            __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k + 8), factor));
            // packs interleaves the 128-bit halves; the permute puts them back in order
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), packed);
        }
#endif
        for (; k < K; k++) out[k] = static_cast<int16_t>(std::nearbyint(row[k] * inverse));
    }
    return rounded;
}

#ifdef __AVX2__
// The sums of the lanes of four int32 vectors, in one vector.
static inline __m128i lane_sums(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
}
#endif

// ROWS rounded rows of x against COLS int8 rows of w.
template <int ROWS, int COLS>
static inline void integer_tile(const int16_t* x, const float* x_scale, const int8_t* w, const float* w_scale,
                                int64_t K, float* y, int64_t N) {
    alignas(16) int32_t acc[ROWS][COLS] = {};
    int64_t k = 0;
#ifdef __AVX2__  // 16 products a step: widen the weights to int16, multiply and add pairs into int32 (vpmaddwd)
    __m256i vector_acc[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; i++) vector_acc[i] = _mm256_setzero_si256();
    for (; k + 16 <= K; k += 16) {
        __m256i weights[COLS];
        for (int c = 0; c < COLS; c++)
            weights[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * K + k)));
        for (int r = 0; r < ROWS; r++) {
            __m256i inputs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * K + k));
            for (int c = 0; c < COLS; c++)
                vector_acc[r * COLS + c] = _mm256_add_epi32(vector_acc[r * COLS + c], _mm256_madd_epi16(inputs, weights[c]));
        }
    }
    int32_t* sums = &acc[0][0];
    if constexpr (ROWS * COLS % 4 == 0) {
        for (int i = 0; i < ROWS * COLS; i += 4)
            _mm_store_si128(reinterpret_cast<__m128i*>(sums + i),
                            lane_sums(vector_acc[i], vector_acc[i + 1], vector_acc[i + 2], vector_acc[i + 3]));
    } else {
        for (int i = 0; i < ROWS * COLS; i++) {
            alignas(32) int32_t lanes[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vector_acc[i]);
            for (int lane = 0; lane < 8; lane++) sums[i] += lanes[lane];
        }
    }
#endif
    for (; k < K; k++)
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < COLS; c++) acc[r][c] += int32_t(x[r * K + k]) * int32_t(w[c * K + k]);
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++) y[r * N + c] = static_cast<float>(acc[r][c]) * x_scale[r] * w_scale[c];
}

// Columns in fours: four rows at a time as two 4 x 2 tiles (eight accumulators, each weight load serving
// four rows), the rows left over one at a time against all four columns.
static void integer_linear(const RoundedRows& x, const int8_t* w, const float* scale, int64_t N, int64_t K, float* y,
                           int64_t B, int threads) {
    const int16_t* xq = x.values.data();
    const float* xs = x.scales.data();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n += 4) {
        if (n + 4 <= N) {
            int64_t b = 0;
            for (; b + 4 <= B; b += 4)
                for (int64_t c = n; c < n + 4; c += 2)
                    integer_tile<4, 2>(xq + b * K, xs + b, w + c * K, scale + c, K, y + b * N + c, N);
            for (; b < B; b++) integer_tile<1, 4>(xq + b * K, xs + b, w + n * K, scale + n, K, y + b * N + n, N);
        } else {
            for (int64_t b = 0; b < B; b++)
                for (int64_t c = n; c < N; c++)
                    integer_tile<1, 1>(xq + b * K, xs + b, w + c * K, scale + c, K, y + b * N + c, N);
        }
    }
}

extern "C" void linear_i8(const int8_t* w, const float* scale, int64_t N, int64_t K, const float* x, float* y,
                          int64_t B, int threads) {
    integer_linear(round_rows(x, B, K), w, scale, N, K, y, B, threads);
}

// Attention of one new token per sequence, the decode step's: for each sequence b and head h, its new
// key and value are stored at position ends[b] - 1 of its cache row rows[b], then its query attends to
// positions 0 .. ends[b] - 1 of that row. Every sum runs in a fixed order over that sequence's own
// positions, so nothing depends on the other sequences. Cache is float or half (rounded to nearest on
// the way in, as torch rounds the prompt's keys and values).
// keys, values: (cache rows, H, L, D) of one layer; queries, new_keys, new_values, out: (B, H, D).
template <typename Cache>
static void decode_attention(const float* queries, const float* new_keys, const float* new_values, Cache* keys,
                             Cache* values, const int64_t* rows, const int64_t* ends, float* out, int64_t B,
                             int64_t H, int64_t L, int64_t D, float scale, int threads) {
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const float* query = queries + (b * H + h) * D;
            Cache* own_keys = keys + (rows[b] * H + h) * L * D;
            Cache* own_values = values + (rows[b] * H + h) * L * D;
            int64_t length = ends[b];
            for (int64_t d = 0; d < D; d++) {
                own_keys[(length - 1) * D + d] = narrow(new_keys[(b * H + h) * D + d], own_keys);
                own_values[(length - 1) * D + d] = narrow(new_values[(b * H + h) * D + d], own_values);
            }
            std::vector<float> weights(length);
            float largest = -INFINITY;
            for (int64_t j = 0; j < length; j++) {
                float score = 0.0f;
                tile<Cache, 1, 1>(query, own_keys + j * D, D, &score, 1);
                weights[j] = score * scale;
                largest = std::max(largest, weights[j]);
            }
            float total = 0.0f;
            for (int64_t j = 0; j < length; j++) {
                weights[j] = std::exp(weights[j] - largest);
                total += weights[j];
            }
            float* result = out + (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) result[d] = 0.0f;
            for (int64_t j = 0; j < length; j++) {
                const Cache* value = own_values + j * D;
                int64_t d = 0;
                for (f8 weight = f8{} + weights[j]; d + 8 <= D; d += 8) {
                    f8 sum = multiply_add(weight, load(value + d), load(result + d));
                    std::memcpy(result + d, &sum, sizeof sum);
                }
                for (; d < D; d++) result[d] = multiply_add(weights[j], widen(value[d]), result[d]);
            }
            for (int64_t d = 0; d < D; d++) result[d] /= total;
        }
}

// RMSNorm of each row: x / sqrt(mean(x^2) + eps) * weight, the sum of squares in the fixed order of tile().
extern "C" void rms_norm(const float* weight, int64_t D, float eps, const float* x, float* y, int64_t B) {
    for (int64_t b = 0; b < B; b++) {
        const float* row = x + b * D;
        float squares = 0.0f;
        tile<float, 1, 1>(row, row, D, &squares, 1);
        float inverse = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
        for (int64_t d = 0; d < D; d++) y[b * D + d] = row[d] * inverse * weight[d];
    }
}

// The whole decode step: one new token for each of B sequences, through every layer to the logits, in one
// call (from Python, the same step costs some forty module calls and as many small tensors per token).
// It is the model's forward pass (model/gpt.py) for one token with a cache, built from the kernels above,
// so every row stays independent of the others.
// layers: per layer the addresses of attn_norm, q, k, v, o, mlp_norm, gate, up, down (a linear layer's
// weight then its int8 scale, 0 for fp32); head: final norm, lm_head weight, lm_head scale.
// keys, values: the cache, (layers, cache rows, H, L, D), float or (half_cache) half; rope_cos, rope_sin:
// (L, D).
struct Projection {
    const void* weight;
    const float* scale;
};

// y[i] = x @ the i-th projection's weight.T, for projections that read the same input (int8: rounded once).
static void project(std::initializer_list<std::pair<Projection, float*>> outputs, int64_t N, int64_t K,
                    const float* x, int64_t B, int threads) {
    RoundedRows rounded;
    if (outputs.begin()->first.scale) rounded = round_rows(x, B, K);
    for (auto [p, y] : outputs) {
        if (p.scale) integer_linear(rounded, static_cast<const int8_t*>(p.weight), p.scale, N, K, y, B, threads);
        else linear_f32(static_cast<const float*>(p.weight), N, K, x, y, B, threads);
    }
}

static void rotate(float* x, const float* cos, const float* sin, int64_t D) {  // apply_rope, one head
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        float first = x[i], second = x[i + half];
        x[i] = first * cos[i] + -second * sin[i];
        x[i + half] = second * cos[i + half] + first * sin[i + half];
    }
}

extern "C" void decode_step(const int64_t* layers, const int64_t* head, const float* embed, int64_t n_layers,
                            int64_t width, int64_t heads, int64_t hidden, int64_t vocab, float eps,
                            const float* rope_cos, const float* rope_sin, const int64_t* tokens, const int64_t* rows,
                            const int64_t* positions, int64_t B, void* keys, void* values, int64_t half_cache,
                            int64_t cache_rows, int64_t L, float* logits, int threads) {
    const int64_t D = width / heads;
    auto projection = [](const int64_t* entry) {
        return Projection{reinterpret_cast<const void*>(entry[0]), reinterpret_cast<const float*>(entry[1])};
    };
    std::vector<float> x(B * width), normed(B * width), q(B * width), k(B * width), v(B * width),
        attended(B * width), update(B * width), gate(B * hidden), up(B * hidden);
    std::vector<int64_t> ends(B);
    for (int64_t b = 0; b < B; b++) {
        std::memcpy(&x[b * width], embed + tokens[b] * width, width * sizeof(float));
        ends[b] = positions[b] + 1;
    }
    for (int64_t layer = 0; layer < n_layers; layer++) {
        const int64_t* entry = layers + layer * 16;  // norm, q (2), k (2), v (2), o (2), norm, gate (2), up (2), down (2)
        rms_norm(reinterpret_cast<const float*>(entry[0]), width, eps, x.data(), normed.data(), B);
        project({{projection(entry + 1), q.data()}, {projection(entry + 3), k.data()}, {projection(entry + 5), v.data()}},
                width, width, normed.data(), B, threads);
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < heads; h++) {
                const float* cos = rope_cos + positions[b] * D;
                const float* sin = rope_sin + positions[b] * D;
                rotate(&q[(b * heads + h) * D], cos, sin, D);
                rotate(&k[(b * heads + h) * D], cos, sin, D);
            }
        int64_t layer_offset = layer * cache_rows * heads * L * D;
        float scale = 1.0f / std::sqrt(static_cast<float>(D));
        if (half_cache)
            decode_attention(q.data(), k.data(), v.data(), static_cast<half*>(keys) + layer_offset,
                             static_cast<half*>(values) + layer_offset, rows, ends.data(), attended.data(), B,
                             heads, L, D, scale, threads);
        else
            decode_attention(q.data(), k.data(), v.data(), static_cast<float*>(keys) + layer_offset,
                             static_cast<float*>(values) + layer_offset, rows, ends.data(), attended.data(), B, heads,
                             L, D, scale, threads);
        project({{projection(entry + 7), update.data()}}, width, width, attended.data(), B, threads);
        for (int64_t i = 0; i < B * width; i++) x[i] += update[i];
        rms_norm(reinterpret_cast<const float*>(entry[9]), width, eps, x.data(), normed.data(), B);
        project({{projection(entry + 10), gate.data()}, {projection(entry + 12), up.data()}}, hidden, width,
                normed.data(), B, threads);
        for (int64_t i = 0; i < B * hidden; i++) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
        project({{projection(entry + 14), update.data()}}, width, hidden, gate.data(), B, threads);
        for (int64_t i = 0; i < B * width; i++) x[i] += update[i];
    }
    rms_norm(reinterpret_cast<const float*>(head[0]), width, eps, x.data(), normed.data(), B);
    project({{projection(head + 1), logits}}, vocab, width, normed.data(), B, threads);
}
