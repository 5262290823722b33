/* A TCP client of a peer elsewhere: `tcp_client HOST PORT SRC` connects from address SRC (the address that
 * moves with the program when it migrates) to HOST:PORT, sends N, expects N + 1 back, and prints "pong N+1"
 * every 50 ms. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT SRC\n", argv[0]);
        return 1;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in src = {0}, dst = {0};
    src.sin_family = AF_INET;
    if (inet_pton(AF_INET, argv[3], &src.sin_addr) != 1 || bind(s, (struct sockaddr *)&src, sizeof src)) return 2;
    dst.sin_family = AF_INET;
    dst.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1 || connect(s, (struct sockaddr *)&dst, sizeof dst)) return 2;
    for (long v = 0;;) {
        if (write(s, &v, sizeof v) != sizeof v) return 3;
        long got;
        if (read(s, &got, sizeof got) != sizeof got) return 4;
        if (got != v + 1) return 5;
        v = got;
        printf("pong %ld\n", v);
        fflush(stdout);
        usleep(50000);
    }
}
