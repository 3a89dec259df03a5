// The CPU's peak f32 FLOP/s per core: 16 independent AVX-512 FMA chains (enough to hide the
// FMA latency on two pipes), timed. Run one copy per core at once to see both cores' peak:
//   gcc -O3 -mavx512f bench/fma_peak.c -o /tmp/fma_peak && (/tmp/fma_peak & /tmp/fma_peak; wait)
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define DECLARE(i) __m512 a##i = _mm512_set1_ps(i);
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, b, c);
#define KEEP(i) __asm__ volatile("" : "+v"(a##i));
#define ADD(i) sum = _mm512_add_ps(sum, a##i);
#define ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)

int main(void) {
    ALL(DECLARE)
    __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    long iterations = 100000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < iterations; k++) {
        ALL(STEP)
    }
    ALL(KEEP)
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    __m512 sum = _mm512_setzero_ps();
    ALL(ADD)
    float lanes[16];
    _mm512_storeu_ps(lanes, sum);
    // 16 chains × 16 lanes × 2 FLOPs per FMA.
    printf("%.1f GFLOP/s per core (checksum %f)\n", iterations * 16.0 * 32 / seconds / 1e9, lanes[0]);
    return 0;
}
