// y = x @ w.T (times a per-output scale for int8 weights), computed so that each output element
// depends only on its own row of x: every element sums its products in one order, fixed by K alone
// (8 lanes of every 8th product, then a fixed tree), whatever the number of rows or how they are
// tiled. BLAS libraries pick kernels by the number of rows, so a row's last bits there depend on the
// rows computed beside it, and sampled text on the requests batched with it.
// Built with -ffp-contract=off, so the compiler fuses no a * b + c on its own: multiply_add decides, the
// same way in every tile shape.
//
// Its entry points are PyTorch operators (torch.ops.rowwise.*, at the end of this file): tensors in and out, each
// checked at the boundary for device, dtype, shape and contiguity, and the indexes a step reads by checked
// against the tensors they index, so that a wrong argument is an error, never a read out of bounds.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
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

// Columns n .. n + 3 (fewer at the end) of y, for every row.
static void linear_f32_columns(const float* w, int64_t N, int64_t K, const float* x, float* y, int64_t B, int64_t n) {
    if (n + 4 <= N) {
        int64_t b = 0;
        for (; b + 4 <= B; b += 4) tile<float, 4, 4>(x + b * K, w + n * K, K, y + b * N + n, N);
        for (; b < B; b++) tile<float, 1, 4>(x + b * K, w + n * K, K, y + b * N + n, N);
    } else {
        for (int64_t c = n; c < N; c++)
            for (int64_t b = 0; b < B; b++) tile<float, 1, 1>(x + b * K, w + c * K, K, y + b * N + c, N);
    }
}

// The kernel's threads: the calling thread and `size` - 1 workers of its own. A decode step hands them some forty
// pieces of work in quick succession, so a worker waits for the next one spinning for a moment, then sleeping,
// so that an idle server holds no core. (OpenMP's workers, from any thread but the process's first, sleep at
// once whenever its threads outnumber the cores, as the engine's do, and a step then costs seven times as long
// in wake-ups.) Who computes what never changes a result: every output element is computed whole by one thread.
class Workers {
  public:
    explicit Workers(int size) : size_(size) {
        for (int index = 1; index < size; index++) threads_.emplace_back([this, index] { work(index); });
    }

    ~Workers() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
            round_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        for (std::thread& thread : threads_) thread.join();
    }

    int size() const { return size_; }

    // Calls task(i) for each i in [0, size): task(0) on the calling thread, the others on the workers; returns
    // when all have returned.
    void run(const std::function<void(int)>& task) {
        if (size_ == 1) return task(0);
        task_ = &task;
        unfinished_.store(size_ - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(mutex_);  // a worker about to sleep sees the new round, or is woken
            round_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        task(0);
        while (unfinished_.load(std::memory_order_acquire) != 0) pause();
    }

  private:
    static void pause() {
#if defined(__x86_64__) || defined(__i386__)
        _mm_pause();
#endif
    }

    void work(int index) {
        for (uint64_t seen = 0;;) {
            auto give_up = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
            while (round_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < give_up)
                for (int i = 0; i < 32; i++) pause();
            if (round_.load(std::memory_order_acquire) == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return round_.load(std::memory_order_acquire) != seen; });
            }
            seen = round_.load(std::memory_order_acquire);
            if (stopping_) return;
            (*task_)(index);
            unfinished_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    const int size_;
    std::vector<std::thread> threads_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> round_{0};
    std::atomic<int> unfinished_{0};
    std::atomic<bool> stopping_{false};
    const std::function<void(int)>* task_ = nullptr;
};

// The calling thread's own Workers (made on its first call: each engine's thread has its own).
static Workers& workers_of_this_thread(int threads) {
    thread_local std::unique_ptr<Workers> workers;
    if (!workers || workers->size() != threads) workers = std::make_unique<Workers>(threads);
    return *workers;
}

// body(first, last) for `threads` consecutive parts of [0, count), on this thread's Workers.
template <typename Body>
static void parallel_for(int64_t count, int threads, Body body) {
    if (threads == 1) {  // on this thread, as part 0 of 1: no task to hand out
        if (count > 0) body(0, count);
        return;
    }
    workers_of_this_thread(threads).run([&](int part) {
        int64_t first = count * part / threads, last = count * (part + 1) / threads;
        if (first < last) body(first, last);
    });
}

// Tiles of four weight rows ahead that a linear layer asks the memory for before it computes the current one.
// A step reads its weights in order (15 MB for the ryangpt shape); while they sit in the CPU's last-level cache
// that costs nothing, but once another process has filled the cache, the hardware prefetcher alone leaves one
// core waiting on memory: the one-row int8 step took 0.80 to 1.01 ms beside a process copying 64 MB, 0.47 to
// 0.59 ms with this (0.44 to 0.56 either way on a quiet machine).
static constexpr int64_t PREFETCH_AHEAD = 8;

template <typename W>
static inline void prefetch_tile_ahead(const W* w, int64_t n, int64_t N, int64_t K) {
    if (n + 4 * (PREFETCH_AHEAD + 1) > N) return;
    const char* ahead = reinterpret_cast<const char*>(w + (n + 4 * PREFETCH_AHEAD) * K);
    for (int64_t byte = 0; byte < 4 * K * static_cast<int64_t>(sizeof(W)); byte += 64) __builtin_prefetch(ahead + byte);
}

static void linear_f32(const float* w, int64_t N, int64_t K, const float* x, float* y, int64_t B, int threads) {
    parallel_for((N + 3) / 4, threads, [&](int64_t first, int64_t last) {
        for (int64_t n = first * 4; n < std::min(N, last * 4); n += 4) {
            prefetch_tile_ahead(w, n, N, K);
            linear_f32_columns(w, N, K, x, y, B, n);
        }
    });
}

// int8: each row of x is rounded to int8 with a scale of its own (its largest magnitude maps to 127), and
// the products with the int8 weights are summed in int32. Integer sums are exact, so their order cannot
// matter: the CPU's widest integer multiply-add is used, and gives the same bits as any other. The scales are
// applied per element. Nothing depends on the other rows.
// The rounded rows are made once for every projection of the same input (q, k and v; gate and up): as int8
// where the CPU multiplies bytes (AVX-512 VNNI: 64 products an instruction, without widening the weights
// first), else as int16 (AVX2 multiplies int16 pairs: 16).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define BYTE_PRODUCTS 1
typedef int8_t rounded_t;
#else
typedef int16_t rounded_t;
#endif

struct RoundedRows {
    std::vector<rounded_t> values;
    std::vector<float> scales;
    // Each row's sum of its values (0 without VNNI, which alone needs them). VNNI multiplies unsigned bytes by
    // signed ones: the weights go in as w + 128 (their top bit flipped), and 128 * this sum comes off again.
    std::vector<int32_t> sums;
};

static RoundedRows round_rows(const float* x, int64_t B, int64_t K) {
    RoundedRows rounded{std::vector<rounded_t>(B * K), std::vector<float>(B), std::vector<int32_t>(B)};
    for (int64_t b = 0; b < B; b++) {
        const float* row = x + b * K;
        rounded_t* out = &rounded.values[b * K];
        float largest = 0.0f;
        for (int64_t k = 0; k < K; k++) largest = std::max(largest, std::fabs(row[k]));
        rounded.scales[b] = largest / 127.0f;
        float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        int64_t k = 0;
        // cvtps rounds to nearest even, as nearbyint does in the default rounding mode
#ifdef BYTE_PRODUCTS
        __m512 factor = _mm512_set1_ps(inverse);
        for (; k + 16 <= K; k += 16) {
            __m512i values = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), factor));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(values));
        }
#elif defined(__AVX2__)
        __m256 factor = _mm256_set1_ps(inverse);
        for (; k + 16 <= K; k += 16) {
            __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), factor));
            __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k + 8), factor));
            // packs interleaves the 128-bit halves; the permute puts them back in order
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), packed);
        }
#endif
        for (; k < K; k++) out[k] = static_cast<rounded_t>(std::nearbyint(row[k] * inverse));
#ifdef BYTE_PRODUCTS
        for (k = 0; k < K; k++) rounded.sums[b] += out[k];
#endif
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

// One step of the integer multiply-add: INTEGER_STEP products of rounded inputs and weights into int32 lanes.
#ifdef BYTE_PRODUCTS  // 64 products: (w + 128) * x, four at a time into each of 16 lanes (vpdpbusd)
static constexpr int64_t INTEGER_STEP = 64;
static constexpr int32_t WEIGHT_OFFSET = 128;
typedef __m512i int_vector;
static inline int_vector zeros() { return _mm512_setzero_si512(); }
static inline int_vector load_inputs(const rounded_t* x) { return _mm512_loadu_si512(x); }
static inline int_vector load_weights(const int8_t* w) {
    return _mm512_xor_si512(_mm512_loadu_si512(w), _mm512_set1_epi8(static_cast<char>(0x80)));
}
static inline int_vector integer_multiply_add(int_vector inputs, int_vector weights, int_vector acc) {
    return _mm512_dpbusd_epi32(acc, weights, inputs);
}
static inline __m256i to_eight_lanes(int_vector v) {  // lane i + lane i + 8
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}
#elif defined(__AVX2__)  // 16 products: the weights widened to int16, pairs multiplied and added (vpmaddwd)
static constexpr int64_t INTEGER_STEP = 16;
static constexpr int32_t WEIGHT_OFFSET = 0;
typedef __m256i int_vector;
static inline int_vector zeros() { return _mm256_setzero_si256(); }
static inline int_vector load_inputs(const rounded_t* x) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
}
static inline int_vector load_weights(const int8_t* w) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}
static inline int_vector integer_multiply_add(int_vector inputs, int_vector weights, int_vector acc) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(inputs, weights));
}
static inline __m256i to_eight_lanes(int_vector v) { return v; }
#else
static constexpr int32_t WEIGHT_OFFSET = 0;
#endif

// ROWS rounded rows of x against COLS int8 rows of w.
template <int ROWS, int COLS>
static inline void integer_tile(const rounded_t* x, const float* x_scale, const int32_t* x_sum, const int8_t* w,
                                const float* w_scale, int64_t K, float* y, int64_t N) {
    alignas(16) int32_t acc[ROWS][COLS] = {};
    int64_t k = 0;
#ifdef __AVX2__
    int_vector vector_acc[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; i++) vector_acc[i] = zeros();
    for (; k + INTEGER_STEP <= K; k += INTEGER_STEP) {
        int_vector weights[COLS];
        for (int c = 0; c < COLS; c++) weights[c] = load_weights(w + c * K + k);
        for (int r = 0; r < ROWS; r++) {
            int_vector inputs = load_inputs(x + r * K + k);
            for (int c = 0; c < COLS; c++)
                vector_acc[r * COLS + c] = integer_multiply_add(inputs, weights[c], vector_acc[r * COLS + c]);
        }
    }
    int32_t* sums = &acc[0][0];
    if constexpr (ROWS * COLS % 4 == 0) {
        for (int i = 0; i < ROWS * COLS; i += 4)
            _mm_store_si128(reinterpret_cast<__m128i*>(sums + i),
                            lane_sums(to_eight_lanes(vector_acc[i]), to_eight_lanes(vector_acc[i + 1]),
                                      to_eight_lanes(vector_acc[i + 2]), to_eight_lanes(vector_acc[i + 3])));
    } else {
        for (int i = 0; i < ROWS * COLS; i++) {
            alignas(32) int32_t lanes[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), to_eight_lanes(vector_acc[i]));
            for (int lane = 0; lane < 8; lane++) sums[i] += lanes[lane];
        }
    }
#endif
    for (; k < K; k++)
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < COLS; c++) acc[r][c] += int32_t(x[r * K + k]) * (int32_t(w[c * K + k]) + WEIGHT_OFFSET);
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++)
            y[r * N + c] = static_cast<float>(acc[r][c] - WEIGHT_OFFSET * x_sum[r]) * x_scale[r] * w_scale[c];
}

// Columns in fours: four rows at a time as two 4 x 2 tiles (eight accumulators, each weight load serving
// four rows), the rows left over one at a time against all four columns.
static void integer_linear(const RoundedRows& x, const int8_t* w, const float* scale, int64_t N, int64_t K, float* y,
                           int64_t B, int threads) {
    const rounded_t* xq = x.values.data();
    const float* xs = x.scales.data();
    const int32_t* sums = x.sums.data();
    parallel_for((N + 3) / 4, threads, [&](int64_t first, int64_t last) {
        for (int64_t n = first * 4; n < std::min(N, last * 4); n += 4) {
            prefetch_tile_ahead(w, n, N, K);
            if (n + 4 <= N) {
                int64_t b = 0;
                for (; b + 4 <= B; b += 4)
                    for (int64_t c = n; c < n + 4; c += 2)
                        integer_tile<4, 2>(xq + b * K, xs + b, sums + b, w + c * K, scale + c, K, y + b * N + c, N);
                for (; b < B; b++) integer_tile<1, 4>(xq + b * K, xs + b, sums + b, w + n * K, scale + n, K, y + b * N + n, N);
            } else {
                for (int64_t b = 0; b < B; b++)
                    for (int64_t c = n; c < N; c++)
                        integer_tile<1, 1>(xq + b * K, xs + b, sums + b, w + c * K, scale + c, K, y + b * N + c, N);
            }
        }
    });
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
    parallel_for(B * H, threads, [&](int64_t first, int64_t last) {
        for (int64_t item = first; item < last; item++) {
            const int64_t b = item / H, h = item % H;
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
    });
}

// RMSNorm of each row: x / sqrt(mean(x^2) + eps) * weight, the sum of squares in the fixed order of tile().
static void rms_norm(const float* weight, int64_t D, float eps, const float* x, float* y, int64_t B) {
    for (int64_t b = 0; b < B; b++) {
        const float* row = x + b * D;
        float squares = 0.0f;
        tile<float, 1, 1>(row, row, D, &squares, 1);
        float inverse = 1.0f / std::sqrt(squares / static_cast<float>(D) + eps);
        for (int64_t d = 0; d < D; d++) y[b * D + d] = row[d] * inverse * weight[d];
    }
}

// A projection's weight (float, or int8 with one scale per output row: scale is then not null).
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

// --- the operators: the typed boundary ------------------------------------------------------------------------

// One block's weights in the order the decode step reads them: each the name of a module of model/gpt.py's Block
// whose `weight` it is. serve/kernel.py takes the model's tensors by these names, and refuses a model whose
// blocks hold any parameter not named here, so the two definitions of the architecture cannot drift apart
// unnoticed. BlockWeight indexes the same list.
static const std::vector<std::string> BLOCK_WEIGHTS = {
    "attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
    "mlp_norm",  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
enum BlockWeight { ATTN_NORM, Q, K, V, O, MLP_NORM, GATE, UP, DOWN, WEIGHTS_PER_BLOCK };

static void check_dense(const at::Tensor& t, at::ScalarType dtype, const std::string& what) {
    TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU, not ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, what, " must be ", dtype, ", not ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

static void check_shape(const at::Tensor& t, at::IntArrayRef shape, const std::string& what) {
    TORCH_CHECK(t.sizes() == shape, what, " must have shape ", shape, ", not ", t.sizes());
}

// A linear layer's weight (N, K), float32, or int8 with its float32 scale (N,); returns it as a Projection.
static Projection projection(const at::Tensor& weight, const std::optional<at::Tensor>& scale, int64_t N, int64_t K,
                             const std::string& what) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kChar, what,
                " must be float32 or int8, not ", weight.scalar_type());
    check_dense(weight, weight.scalar_type(), what);
    check_shape(weight, {N, K}, what);
    if (weight.scalar_type() == at::kFloat) {
        TORCH_CHECK(!scale.has_value(), what, ": a float32 weight takes no scale");
        return {weight.data_ptr(), nullptr};
    }
    TORCH_CHECK(scale.has_value(), what, ": an int8 weight needs its scale");
    check_dense(*scale, at::kFloat, what + "'s scale");
    check_shape(*scale, {N}, what + "'s scale");
    return {weight.data_ptr(), scale->data_ptr<float>()};
}

static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                         int64_t threads) {
    check_dense(x, at::kFloat, "x");
    TORCH_CHECK(threads > 0, "threads must be at least 1, not ", threads);
    TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2, "x (..., K) and a weight (N, K) expected");
    const int64_t N = weight.size(0), K = weight.size(1);
    TORCH_CHECK(K > 0, "the weight must take at least one feature, not ", weight.sizes());
    TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features; the weight takes ", K);
    Projection p = projection(weight, scale, N, K, "the weight");
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    project({{p, y.data_ptr<float>()}}, N, K, x.data_ptr<float>(), x.numel() / K, threads);
    return y;
}

static at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_dense(x, at::kFloat, "x");
    check_dense(weight, at::kFloat, "the norm's weight");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) > 0, "the norm's weight must be (width), not ", weight.sizes());
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(0), "x (..., ", weight.size(0), ") expected, not ",
                x.sizes());
    at::Tensor y = at::empty_like(x);
    const int64_t D = weight.size(0);
    rms_norm(weight.data_ptr<float>(), D, static_cast<float>(eps), x.data_ptr<float>(), y.data_ptr<float>(),
             x.numel() / D);
    return y;
}

// The whole decode step of one model on one cache: one new token for each of B sequences, through every layer to
// the logits, in one call (from Python, the same step costs some forty module calls and as many small tensors per
// token). It is model/gpt.py's forward pass for one token with a cache, built from the kernels above, every row
// on its own. An object, so that the model's tensors and the cache are checked once, when it is made, and held
// (counted references: nothing it reads can be freed under it); a step then checks only what it is given.
// weights, scales: per layer, BLOCK_WEIGHTS's tensors and their int8 scales (none for norms and float weights).
// keys, values: the cache, (layers, cache rows, heads, L, head size), float32 or float16, written by each step.
// rope_cos, rope_sin: (L or more, head size).
struct Decoder : torch::CustomClassHolder {
    struct Layer {
        const float *attn_norm, *mlp_norm;
        Projection q, k, v, o, gate, up, down;
    };

    // What it holds, so that the pointers below stay valid as long as it lives.
    std::vector<at::Tensor> tensors;
    std::vector<Layer> layers;
    const float *embed, *final_norm, *rope_cos, *rope_sin;
    Projection head;
    void *keys, *values;
    bool half_cache;
    int64_t vocab, width, heads, D, hidden, cache_rows, L, threads;
    float eps;

    Decoder(at::Tensor embed_, std::vector<at::Tensor> weights, c10::List<std::optional<at::Tensor>> scales,
            at::Tensor final_norm_, at::Tensor head_, std::optional<at::Tensor> head_scale, at::Tensor rope_cos_,
            at::Tensor rope_sin_, at::Tensor keys_, at::Tensor values_, int64_t heads_, double eps_,
            int64_t threads_)
        : heads(heads_), threads(threads_), eps(static_cast<float>(eps_)) {
        check_dense(embed_, at::kFloat, "embed");
        TORCH_CHECK(embed_.dim() == 2, "embed must be (vocab, width)");
        vocab = embed_.size(0), width = embed_.size(1);
        TORCH_CHECK(heads > 0 && width % heads == 0 && width / heads % 2 == 0, "heads (", heads,
                    ") must split the width (", width, ") into even head sizes");
        TORCH_CHECK(threads > 0, "threads must be at least 1, not ", threads);
        D = width / heads;
        TORCH_CHECK(!weights.empty() && weights.size() % WEIGHTS_PER_BLOCK == 0 && scales.size() == weights.size(),
                    "weights and scales: ", static_cast<int>(WEIGHTS_PER_BLOCK), " per layer each (BLOCK_WEIGHTS), not ",
                    weights.size(), " and ", scales.size());
        const int64_t n_layers = weights.size() / WEIGHTS_PER_BLOCK;
        TORCH_CHECK(weights[GATE].dim() == 2, "layers.0.", BLOCK_WEIGHTS[GATE], ".weight must be 2-D, not ",
                    weights[GATE].sizes());
        hidden = weights[GATE].size(0);
        for (const at::Tensor* t : {&keys_, &values_}) {
            TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf,
                        "the cache must be float32 or float16");
            check_dense(*t, keys_.scalar_type(), "the cache's keys and values");
            TORCH_CHECK(t->dim() == 5 && t->size(0) == n_layers && t->size(2) == heads && t->size(4) == D,
                        "the cache must be (", n_layers, ", rows, ", heads, ", length, ", D, "), not ", t->sizes());
        }
        check_shape(values_, keys_.sizes(), "the cache's values");
        cache_rows = keys_.size(1), L = keys_.size(3);
        for (const at::Tensor* t : {&rope_cos_, &rope_sin_}) {
            check_dense(*t, at::kFloat, "the rotary tables");
            TORCH_CHECK(t->dim() == 2 && t->size(0) >= L && t->size(1) == D, "the rotary tables must be (>= ", L,
                        ", ", D, ")");
        }
        for (int64_t l = 0; l < n_layers; l++) {
            auto at = [&](BlockWeight w) -> const at::Tensor& { return weights[l * WEIGHTS_PER_BLOCK + w]; };
            auto scale = [&](BlockWeight w) { return scales.get(l * WEIGHTS_PER_BLOCK + w); };
            // the model's own name for it, as in its state dict
            auto name = [&](BlockWeight w) { return "layers." + std::to_string(l) + "." + BLOCK_WEIGHTS[w] + ".weight"; };
            for (BlockWeight norm : {ATTN_NORM, MLP_NORM}) {
                check_dense(at(norm), at::kFloat, name(norm));
                check_shape(at(norm), {width}, name(norm));
                TORCH_CHECK(!scale(norm).has_value(), name(norm), " is a norm's weight: it takes no scale");
            }
            auto projection_of = [&](BlockWeight w, int64_t outputs, int64_t inputs) {
                return projection(at(w), scale(w), outputs, inputs, name(w));
            };
            layers.push_back({at(ATTN_NORM).data_ptr<float>(), at(MLP_NORM).data_ptr<float>(),
                              projection_of(Q, width, width), projection_of(K, width, width),
                              projection_of(V, width, width), projection_of(O, width, width),
                              projection_of(GATE, hidden, width), projection_of(UP, hidden, width),
                              projection_of(DOWN, width, hidden)});
        }
        check_dense(final_norm_, at::kFloat, "the final norm's weight");
        check_shape(final_norm_, {width}, "the final norm's weight");
        head = projection(head_, head_scale, vocab, width, "the output head");
        embed = embed_.data_ptr<float>(), final_norm = final_norm_.data_ptr<float>();
        rope_cos = rope_cos_.data_ptr<float>(), rope_sin = rope_sin_.data_ptr<float>();
        half_cache = keys_.scalar_type() == at::kHalf;
        keys = keys_.data_ptr(), values = values_.data_ptr();
        tensors = weights;
        for (size_t i = 0; i < scales.size(); i++)
            if (std::optional<at::Tensor> scale = scales.get(i)) tensors.push_back(*scale);
        for (const auto& t : {embed_, final_norm_, head_, rope_cos_, rope_sin_, keys_, values_}) tensors.push_back(t);
        if (head_scale) tensors.push_back(*head_scale);
    }

    // Logits (B, vocab) of the next token of each sequence: tokens[b] at position positions[b] of cache row
    // rows[b], whose earlier positions the cache holds.
    at::Tensor step(std::vector<int64_t> tokens, std::vector<int64_t> rows, std::vector<int64_t> positions) {
        const int64_t B = tokens.size();
        TORCH_CHECK(rows.size() == tokens.size() && positions.size() == tokens.size(),
                    "tokens, rows and positions must have one entry per sequence");
        for (int64_t b = 0; b < B; b++) {
            TORCH_CHECK(0 <= tokens[b] && tokens[b] < vocab, "token ", tokens[b], " is not in the vocabulary of ",
                        vocab);
            TORCH_CHECK(0 <= rows[b] && rows[b] < cache_rows, "row ", rows[b], " is not in the cache's ",
                        cache_rows);
            TORCH_CHECK(0 <= positions[b] && positions[b] < L, "position ", positions[b], " is past the cache's ", L);
        }
        at::Tensor logits = at::empty({B, vocab}, at::kFloat);
        const int n_threads = static_cast<int>(threads);
        const float scale = 1.0f / std::sqrt(static_cast<float>(D));
        std::vector<float> x(B * width), normed(B * width), q(B * width), k(B * width), v(B * width),
            attended(B * width), update(B * width), gate(B * hidden), up(B * hidden);
        std::vector<int64_t> ends(B);
        for (int64_t b = 0; b < B; b++) {
            std::memcpy(&x[b * width], embed + tokens[b] * width, width * sizeof(float));
            ends[b] = positions[b] + 1;
        }
        const int64_t layer_size = cache_rows * heads * L * D;  // one layer's part of the cache
        for (size_t l = 0; l < layers.size(); l++) {
            const Layer& layer = layers[l];
            rms_norm(layer.attn_norm, width, eps, x.data(), normed.data(), B);
            project({{layer.q, q.data()}, {layer.k, k.data()}, {layer.v, v.data()}}, width, width, normed.data(), B,
                    n_threads);
            for (int64_t b = 0; b < B; b++)
                for (int64_t h = 0; h < heads; h++) {
                    rotate(&q[(b * heads + h) * D], rope_cos + positions[b] * D, rope_sin + positions[b] * D, D);
                    rotate(&k[(b * heads + h) * D], rope_cos + positions[b] * D, rope_sin + positions[b] * D, D);
                }
            if (half_cache)
                decode_attention(q.data(), k.data(), v.data(), static_cast<half*>(keys) + l * layer_size,
                                 static_cast<half*>(values) + l * layer_size, rows.data(), ends.data(),
                                 attended.data(), B, heads, L, D, scale, n_threads);
            else
                decode_attention(q.data(), k.data(), v.data(), static_cast<float*>(keys) + l * layer_size,
                                 static_cast<float*>(values) + l * layer_size, rows.data(), ends.data(),
                                 attended.data(), B, heads, L, D, scale, n_threads);
            project({{layer.o, update.data()}}, width, width, attended.data(), B, n_threads);
            for (int64_t i = 0; i < B * width; i++) x[i] += update[i];
            rms_norm(layer.mlp_norm, width, eps, x.data(), normed.data(), B);
            project({{layer.gate, gate.data()}, {layer.up, up.data()}}, hidden, width, normed.data(), B, n_threads);
            for (int64_t i = 0; i < B * hidden; i++) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
            project({{layer.down, update.data()}}, width, hidden, gate.data(), B, n_threads);
            for (int64_t i = 0; i < B * width; i++) x[i] += update[i];
        }
        rms_norm(final_norm, width, eps, x.data(), normed.data(), B);
        project({{head, logits.data_ptr<float>()}}, vocab, width, normed.data(), B, n_threads);
        return logits;
    }
};

static std::vector<std::string> block_weights() { return BLOCK_WEIGHTS; }

TORCH_LIBRARY(rowwise, m) {
    m.def("linear(Tensor x, Tensor weight, Tensor? scale, int threads) -> Tensor", &linear);
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm_rows);
    m.def("block_weights() -> str[]", &block_weights);
    m.class_<Decoder>("Decoder")
        .def(torch::init<at::Tensor, std::vector<at::Tensor>, c10::List<std::optional<at::Tensor>>, at::Tensor,
                         at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         int64_t, double, int64_t>())
        .def("step", &Decoder::step);
}
