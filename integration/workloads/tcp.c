/* One process holding both ends of an established loopback TCP connection: the client sends N, the
 * server answers N + 1, and the client prints "pong N+1" every 20 ms. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
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
