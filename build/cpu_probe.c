/* Executes one instruction of every x86 extension the compiler was told to
 * use (-mavx2, -mavx512f, -mamx-int8, ...), so that a build can tell what
 * really runs on this machine from what cpuid merely advertises. Exit 0: all
 * of them ran. A fault kills the process (SIGILL), which the caller reports. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int sink;

int main(void) {
    float f[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };
    (void) f;
#ifdef __SSE4_2__
    sink += (int) _mm_crc32_u32((unsigned) sink, 42u);
#endif
#ifdef __AVX__
    { __m256 a = _mm256_loadu_ps(f); a = _mm256_add_ps(a, a); sink += (int) _mm256_cvtss_f32(a); }
#endif
#ifdef __F16C__
    { __m128i h = _mm_set1_epi16(0x3c00); sink += (int) _mm_cvtss_f32(_mm_cvtph_ps(h)); }
#endif
#ifdef __FMA__
    { __m256 a = _mm256_loadu_ps(f); a = _mm256_fmadd_ps(a, a, a); sink += (int) _mm256_cvtss_f32(a); }
#endif
#ifdef __AVX2__
    { __m256i a = _mm256_set1_epi32(sink + 1); a = _mm256_add_epi32(a, a); sink += _mm256_extract_epi32(a, 0); }
#endif
#ifdef __BMI2__
    sink += (int) _pdep_u32((unsigned) sink + 7u, 0x0f0fu);
#endif
#ifdef __AVXVNNI__
    { __m256i a = _mm256_set1_epi32(sink + 1); a = _mm256_dpbusd_avx_epi32(a, a, a); sink += _mm256_extract_epi32(a, 0); }
#endif
#ifdef __AVX512F__
    { __m512 a = _mm512_loadu_ps(f); a = _mm512_add_ps(a, a); sink += (int) _mm512_reduce_add_ps(a); }
#endif
#ifdef __AVX512BW__
    { __m512i a = _mm512_set1_epi8((char) sink); a = _mm512_add_epi8(a, a); sink += _mm_cvtsi128_si32(_mm512_castsi512_si128(a)); }
#endif
#ifdef __AVX512VBMI__
    { __m512i a = _mm512_set1_epi8(3); a = _mm512_permutexvar_epi8(a, a); sink += _mm_cvtsi128_si32(_mm512_castsi512_si128(a)); }
#endif
#ifdef __AVX512VNNI__
    { __m512i a = _mm512_set1_epi32(sink + 1); a = _mm512_dpbusd_epi32(a, a, a); sink += _mm_cvtsi128_si32(_mm512_castsi512_si128(a)); }
#endif
#ifdef __AVX512BF16__
    { __m512 a = _mm512_loadu_ps(f); __m512bh b = _mm512_cvtne2ps_pbh(a, a); sink += (int) _mm512_reduce_add_ps(_mm512_dpbf16_ps(a, b, b)); }
#endif
#if defined(__AMX_TILE__)
    {
        /* the kernel hands out AMX state on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
        if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
            fprintf(stderr, "ARCH_REQ_XCOMP_PERM refused\n");
            return 2;
        }
        struct { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg;
        static int8_t  a[16 * 64], b[16 * 64];
        static int32_t c[16 * 16];
        memset(&cfg, 0, sizeof(cfg));
        cfg.palette = 1;
        for (int i = 0; i < 3; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
        _tile_loadconfig(&cfg);
        _tile_loadd(1, a, 64);
        _tile_loadd(2, b, 64);
        _tile_zero(0);
#ifdef __AMX_INT8__
        _tile_dpbssd(0, 1, 2);
#endif
#ifdef __AMX_BF16__
        _tile_dpbf16ps(0, 1, 2);
#endif
        _tile_stored(0, c, 64);
        _tile_release();
        sink += c[0];
    }
#endif
    printf("ok %d\n", sink);
    return 0;
}
