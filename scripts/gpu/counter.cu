// The GPU smoke test's program (scripts/gpu-smoke.sh): N MiB of device memory holding a pattern derived
// from a counter. Every 200 ms: advance the counter on the GPU, rewrite the pattern, check every word on
// the GPU, and print `count N sum S bad B` (B words differ from the pattern; S is a checksum of them).
#include <cstdio>
#include <cstdlib>
#include <unistd.h>

__device__ unsigned long long counter = 0;

__device__ unsigned int pattern(unsigned long long i, unsigned long long n) {
    unsigned long long x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (n * 0xBF58476D1CE4E5B9ull);
    return (unsigned int)(x ^ (x >> 31));
}

__global__ void step(unsigned int *buf, size_t words) {
    if (blockIdx.x == 0 && threadIdx.x == 0) counter++;
}

__global__ void fill(unsigned int *buf, size_t words) {
    unsigned long long n = counter;
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x)
        buf[i] = pattern(i, n);
}

__global__ void check(const unsigned int *buf, size_t words, unsigned long long *bad, unsigned long long *sum) {
    unsigned long long n = counter;
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
        if (buf[i] != pattern(i, n)) atomicAdd(bad, 1ull);
        atomicAdd(sum, (unsigned long long)buf[i]);
    }
}

#define OK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA error %s at %s\n", cudaGetErrorString(e), #x); return 2; } } while (0)

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], nullptr, 10) : 256;
    size_t words = mib * 1024 * 1024 / sizeof(unsigned int);
    unsigned int *buf;
    unsigned long long *stats, host[2];
    OK(cudaMalloc(&buf, words * sizeof(unsigned int)));
    OK(cudaMalloc(&stats, 2 * sizeof(unsigned long long)));
    for (;;) {
        step<<<1, 1>>>(buf, words);
        fill<<<1024, 256>>>(buf, words);
        OK(cudaMemset(stats, 0, 2 * sizeof(unsigned long long)));
        check<<<1024, 256>>>(buf, words, stats, stats + 1);
        OK(cudaMemcpy(host, stats, sizeof host, cudaMemcpyDeviceToHost));
        unsigned long long n;
        OK(cudaMemcpyFromSymbol(&n, counter, sizeof n));
        printf("count %llu sum %llx bad %llu\n", n, host[1], host[0]);
        fflush(stdout);
        usleep(200000);
    }
}
