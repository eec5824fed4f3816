/*
 * The floor for the primary's CPU per connection: a bare blocking accept4() + close() loop on
 * 127.0.0.1, nothing else. scripts/bench.sh builds it with the system C compiler and loads it
 * with the connection-per-request workload, so each report can set "primary CPU µs per handed
 * connection" beside what the kernel's accept and close alone cost on the same machine, at the
 * same time. (wrk sees the connections closed unanswered and counts read errors; only the
 * connection rate matters here.)
 *
 * Prints the bound port on stdout; on SIGTERM prints
 *   conns=N cpu_us=U us_per_conn=X
 * on stderr, counting CPU (user+system, getrusage) from the first accepted connection on.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop = 0;

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

static double cpu_us(const struct rusage *r) {
    return (r->ru_utime.tv_sec + r->ru_stime.tv_sec) * 1e6 + r->ru_utime.tv_usec +
           r->ru_stime.tv_usec;
}

int main(void) {
    int one = 1;
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0) {
        perror("socket");
        return 1;
    }
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 4096) < 0 ||
        getsockname(l, (struct sockaddr *)&a, &len) < 0) {
        perror("bind/listen");
        return 1;
    }
    printf("%d\n", ntohs(a.sin_port));
    fflush(stdout);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: accept4 returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    long conns = 0;
    struct rusage r0, r1;
    while (!stop) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        if (conns++ == 0)
            getrusage(RUSAGE_SELF, &r0);
        close(c);
    }
    getrusage(RUSAGE_SELF, &r1);
    double us = conns ? cpu_us(&r1) - cpu_us(&r0) : 0;
    fprintf(stderr, "conns=%ld cpu_us=%.0f us_per_conn=%.2f\n", conns, us,
            conns > 1 ? us / (conns - 1) : 0.0);
    return 0;
}
