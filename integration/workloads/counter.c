/* Prints 1, 2, 3, ... one per line every 20 ms. Args: [count (0 = forever)] [exit code]. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 0;
    int code = argc > 2 ? atoi(argv[2]) : 0;
    char line[32];
    for (long i = 1; count == 0 || i <= count; i++) {
        int n = snprintf(line, sizeof line, "%ld\n", i);
        if (write(1, line, n) != n) return 3;
        usleep(20000);
    }
    return code;
}
