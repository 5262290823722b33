/* One process holding both ends of an established loopback TCP connection: the client sends N, the
 * server answers N + 1, and the client prints "pong N+1" every 20 ms. An optional argument fills that many
 * MiB of memory first (random bytes: a dump of it lasts, for tests that act while the network is locked). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t words = argc > 1 ? (size_t)atol(argv[1]) * 1024 * 1024 / 8 : 0;
    uint64_t *buf = words ? malloc(words * 8) : NULL;
    if (words && !buf) return 2;
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        buf[i] = x;
    }
    int lst = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lst, (struct sockaddr *)&a, sizeof a) || listen(lst, 1)) return 2;
    socklen_t len = sizeof a;
    getsockname(lst, (struct sockaddr *)&a, &len);
    int cli = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(cli, (struct sockaddr *)&a, sizeof a)) return 2;
    int srv = accept(lst, NULL, NULL);
    if (srv < 0) return 2;
    close(lst);
    char line[64];
    for (long v = 0;;) {
        if (write(cli, &v, sizeof v) != sizeof v) return 3;
        long got;
        if (read(srv, &got, sizeof got) != sizeof got) return 4;
        got++;
        if (write(srv, &got, sizeof got) != sizeof got) return 3;
        if (read(cli, &v, sizeof v) != sizeof v) return 4;
        int n = snprintf(line, sizeof line, "pong %ld\n", v);
        if (write(1, line, n) != n) return 3;
        usleep(20000);
    }
}
