/*
 * loadgen.c -- the load generator of `make bench`.
 *
 * One thread, one level-triggered epoll, no dependencies. It opens N
 * WebSocket clients to the service (tokens come from a file written by
 * bench/run.py, so there is no crypto here), subscribes each to one channel,
 * then sends broadcasts through POST /broadcast and measures, per delivery,
 * the latency from the POST to the frame arriving. While the fan-out runs it
 * also times GET /health on its own connection, to show the worker stays
 * responsive. It prints one JSON object on stdout.
 *
 *   loadgen --port 3001 --tokens tokens.txt --clients 1000 --broadcasts 100
 *           --interval-ms 0 --admin-secret S --pids "123 124" [options]
 *
 * interval 0 is a closed loop (each POST awaited before the next);
 * interval > 0 an open loop (POST k sent at start + k*interval, up to 64 in
 * flight), so a slow server shows up as latency, not as a slower sender.
 *
 * Storm mode (--storm-hup-pid P): once every client is subscribed, broadcasts
 * flow at --storm-rate per second for --storm-seconds, and after
 * --storm-after-ms the master P gets a SIGHUP (a deploy). Every client closed
 * with 1012 reconnects after a random 0.25-1 s (as realtime.js does) and
 * resumes with its clientId, epoch and last offset; every POST carries an
 * Idempotency-Key and is retried until it is accepted. It reports how long
 * until every client was back and recovered, how many broadcasts each
 * replayed, and any loss or duplicate.
 *
 * Connect storm (--probe-every-ms N): while the clients connect, GET /health
 * every --health-every-ms and POST a probe broadcast every N ms; it reports
 * the /health latency during the connect phase and how long each probe took
 * to reach the clients already subscribed. In storm mode /health is polled
 * through the reload too.
 *
 * --browser-headers 1: each upgrade also carries the headers a browser sends
 * (Chrome's, with a session cookie and a permessage-deflate offer): thirteen
 * headers instead of five, for what a real reconnect storm costs the server.
 *
 * Loopback only: it connects to --host, which must be 127.0.0.1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------ options -- */
static const char *opt_host = "127.0.0.1", *opt_path = "/ws", *opt_tokens = NULL;
static const char *opt_channel = "system:announcements", *opt_secret = "", *opt_pids = "", *opt_extra_pids = "";
static int opt_port = 3001, opt_clients = 1000, opt_concurrency = 200, opt_broadcasts = 100;
static int opt_interval_ms = 0, opt_warmup = 5, opt_payload = 0, opt_drain_ms = 30000, opt_max_run_s = 280;
static int opt_health_ms = 50, opt_probe_ms = 0, opt_browser = 0;
/* What Chrome adds to an upgrade (bench/connect_instructions.py --browser-headers); %d: the port. */
static char browser_headers[1024] = "";
static const char BROWSER_HEADERS[] =
    "Pragma: no-cache\r\nCache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n"
    "Origin: http://127.0.0.1:%d\r\nAccept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
    "Cookie: clinic_session=eyJzaWQiOiJiZW5jaCIsInNpbmNlIjoxNzY0OTcyODAwLCJ1c2VyX2lkIjoiYmVuY2gifQ.Z1Kx9A.bench-cookie-signature-of-a-session\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
static int opt_storm_pid = 0, opt_storm_rate = 50, opt_storm_seconds = 8, opt_storm_after_ms = 1000;

/* ------------------------------------------------------------ helpers -- */
static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static double now_wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}
static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rand32(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)rng;
}

/* Sum RSS (kB) and CPU (s) of a space-separated pid list from /proc. */
static void proc_usage(const char *pids, double *rss_mb, double *cpu_s) {
    *rss_mb = 0; *cpu_s = 0;
    char list[4096];
    snprintf(list, sizeof list, "%s", pids);
    long tick = sysconf(_SC_CLK_TCK);
    for (char *tok = strtok(list, " ,"); tok; tok = strtok(NULL, " ,")) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%s/status", tok);
        FILE *f = fopen(path, "r");
        if (f) {
            while (fgets(buf, sizeof buf, f))
                if (!strncmp(buf, "VmRSS:", 6)) *rss_mb += atof(buf + 6) / 1024.0;
            fclose(f);
        }
        snprintf(path, sizeof path, "/proc/%s/stat", tok);
        f = fopen(path, "r");
        if (f) {
            if (fgets(buf, sizeof buf, f)) {
                char *p = strrchr(buf, ')');
                unsigned long ut = 0, st = 0;
                /* fields after ')': state(3) ... utime(14) stime(15) */
                if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
                    *cpu_s += (double)(ut + st) / tick;
            }
            fclose(f);
        }
    }
}
static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------ state -- */
enum { C_CONNECTING, C_HANDSHAKE, C_WAIT_CONNECTED, C_WAIT_SUBSCRIBED, C_READY, C_AWAY, C_DEAD };
enum { K_CLIENT = 1, K_POST = 2, K_HEALTH = 3, K_PROBE = 4 };

typedef struct {
    int kind, fd, state, index;
    char *buf;
    size_t len, cap;
} Conn;

typedef struct { /* an HTTP keep-alive connection for POST /broadcast or GET /health */
    Conn c;
    int busy, seq;
    double sent_at;
    char *out;
    size_t out_len, out_off;
} Http;

static Conn *clients;
typedef struct { /* where a client is in the stream, to resume from (storm mode) */
    char client_id[48], epoch[48];
    long offset, connected_at_offset;
    double reopen_at;
    int replayed, away;
} Position;
static Position *positions;
static long storm_recovered, storm_not_recovered, storm_replayed, storm_away;
static double t_hup, t_last_back;
static char run_id[32];
static char **tokens;
static uint8_t *seen;        /* clients x total seqs */
static int total_seqs;
static double *latencies;
static double *probe_lat; /* connect storm: probe latencies, one per reception */
static long n_probe_lat, probe_cap;
static int probes_sent, probes_ok;
static long n_lat, delivered, duplicates, warm_delivered, unexpected;
static int n_connected, n_subscribed, n_dead, connecting_now, next_to_open;
static double t_first_connect, t_all_connected, t_first_sub, t_all_subscribed;
static double t_first_send, t_last_recv;
static int ep;
static char rbuf[1 << 16];

static void conn_add(Conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}
static void conn_mod(Conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}
static int tcp_connect(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket: %s (raise ulimit -n)", strerror(errno));
    set_nonblock(fd);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(opt_port)};
    inet_pton(AF_INET, opt_host, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) die("connect: %s", strerror(errno));
    return fd;
}
static void buf_append(Conn *c, const char *data, size_t n) {
    if (c->len + n > c->cap) {
        c->cap = (c->len + n) * 2 + 256;
        c->buf = realloc(c->buf, c->cap);
    }
    memcpy(c->buf + c->len, data, n);
    c->len += n;
}
static void send_all(int fd, const char *data, size_t n) { /* small writes on fresh sockets */
    while (n) {
        ssize_t w = write(fd, data, n);
        if (w < 0) { if (errno == EAGAIN || errno == EINTR) continue; return; }
        data += w; n -= w;
    }
}
static void send_masked_text(int fd, const char *payload, size_t n) {
    char frame[512];
    if (n > 400) die("client frame too long");
    uint32_t mask = rand32();
    frame[0] = (char)0x81;
    frame[1] = (char)(0x80 | n);
    memcpy(frame + 2, &mask, 4);
    for (size_t i = 0; i < n; i++) frame[6 + i] = payload[i] ^ ((char *)&mask)[i % 4];
    send_all(fd, frame, n + 6);
}

/* -------------------------------------------------------- WebSocket -- */
static void client_dead(Conn *c) {
    if (c->state == C_DEAD || c->state == C_AWAY) return;
    if (c->state <= C_WAIT_CONNECTED) connecting_now--;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->len = 0;
    if (opt_storm_pid && positions[c->index].client_id[0]) { /* storm: come back later and resume */
        c->state = C_AWAY;
        if (!positions[c->index].away) { positions[c->index].away = 1; storm_away++; }
        positions[c->index].reopen_at = now_mono() + 0.25 + (rand32() % 750) / 1000.0;
        return;
    }
    c->state = C_DEAD;
    n_dead++;
}
static void copy_string(const char *p, size_t n, const char *key, char *out, size_t cap) {
    char *hit = memmem(p, n, key, strlen(key));
    out[0] = 0;
    if (!hit) return;
    const char *q = hit + strlen(key), *end = p + n;
    size_t i = 0;
    while (q < end && *q != '"' && i + 1 < cap) out[i++] = *q++;
    out[i] = 0;
}
static long find_number(const char *p, size_t n, const char *key) {
    void *hit = memmem(p, n, key, strlen(key));
    if (!hit) return -1000000000L;
    const char *q = (const char *)hit + strlen(key);
    while (*q == ' ') q++;
    return strtol(q, NULL, 10);
}
static double find_double(const char *p, size_t n, const char *key) {
    void *hit = memmem(p, n, key, strlen(key));
    if (!hit) return -1;
    const char *q = (const char *)hit + strlen(key);
    while (*q == ' ') q++;
    return strtod(q, NULL);
}
static void send_subscribe(Conn *c) {
    char sub[256];
    int len = snprintf(sub, sizeof sub, "{\"type\":\"SUBSCRIBE\",\"data\":{\"channels\":[\"%s\"]}}", opt_channel);
    if (!t_first_sub) t_first_sub = now_mono();
    send_masked_text(c->fd, sub, len);
}
static void on_text(Conn *c, const char *p, size_t n, double recv_ms) {
    Position *at = positions ? &positions[c->index] : NULL;
    if (c->state == C_WAIT_CONNECTED) {
        if (!memmem(p, n, "\"CONNECTED\"", 11)) { unexpected++; return; }
        connecting_now--;
        c->state = C_WAIT_SUBSCRIBED;
        int resuming = at && at->client_id[0];
        if (at) {
            copy_string(p, n, "\"clientId\":\"", at->client_id, sizeof at->client_id);
            copy_string(p, n, "\"epoch\":\"", at->epoch, sizeof at->epoch);
            at->connected_at_offset = find_number(p, n, "\"offset\":");
        }
        if (resuming) { /* storm: back after the 1012 */
            t_last_back = now_mono();
            if (at->away) { at->away = 0; storm_away--; }
            if (memmem(p, n, "\"recovered\":true", 16)) {
                storm_recovered++;
                c->state = C_READY; /* its subscription was restored: nothing to send */
                return;
            }
            storm_not_recovered++; /* refused: subscribe again, as a browser would (what it missed is lost) */
            at->offset = at->connected_at_offset;
            send_subscribe(c);
            return;
        }
        if (at) at->offset = at->connected_at_offset;
        n_connected++;
        t_all_connected = now_mono();
        send_subscribe(c);
        return;
    }
    if (c->state == C_WAIT_SUBSCRIBED) {
        if (!memmem(p, n, "\"SUBSCRIBED\"", 12)) { unexpected++; return; }
        c->state = C_READY;
        if (storm_recovered + storm_not_recovered == 0) { n_subscribed++; t_all_subscribed = now_mono(); }
        return;
    }
    if (at) {
        long offset = find_number(p, n, "\"offset\":");
        if (offset > 0) {
            if (offset <= at->connected_at_offset && t_hup) { at->replayed++; storm_replayed++; }
            at->offset = offset;
        }
    }
    if (memmem(p, n, "\"probe\":", 8)) { /* a connect-storm probe: how long it took to get here */
        double t = find_double(p, n, "\"t\":");
        if (t > 0 && n_probe_lat < probe_cap) probe_lat[n_probe_lat++] = recv_ms - t;
        return;
    }
    long seq = find_number(p, n, "\"seq\":");
    if (seq < 0 || seq >= total_seqs) { unexpected++; return; }
    uint8_t *slot = &seen[(size_t)c->index * total_seqs + seq];
    if (*slot) { duplicates++; return; }
    *slot = 1;
    if (seq < opt_warmup) { warm_delivered++; return; }
    delivered++;
    t_last_recv = now_mono();
    double t = find_double(p, n, "\"t\":");
    if (t > 0) latencies[n_lat++] = recv_ms - t;
}
static void on_client_data(Conn *c) {
    for (int reads = 0; reads < 4; reads++) {
        ssize_t r = read(c->fd, rbuf, sizeof rbuf);
        if (r < 0) { if (errno == EAGAIN) break; client_dead(c); return; }
        if (r == 0) { client_dead(c); return; }
        buf_append(c, rbuf, r);
        if (r < (ssize_t)sizeof rbuf) break;
    }
    double recv_ms = now_wall_ms();
    size_t off = 0;
    if (c->state == C_HANDSHAKE) {
        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!end) return;
        if (strncmp(c->buf, "HTTP/1.1 101", 12)) { client_dead(c); return; }
        off = end + 4 - c->buf;
        c->state = C_WAIT_CONNECTED;
    }
    while (c->len - off >= 2) {
        unsigned char *h = (unsigned char *)c->buf + off;
        int op = h[0] & 0x0F;
        uint64_t n = h[1] & 0x7F;
        size_t head = 2;
        if (n == 126) { if (c->len - off < 4) break; n = ((uint64_t)h[2] << 8) | h[3]; head = 4; }
        else if (n == 127) {
            if (c->len - off < 10) break;
            n = 0;
            for (int i = 0; i < 8; i++) n = (n << 8) | h[2 + i];
            head = 10;
        }
        if (c->len - off < head + n) break;
        const char *payload = c->buf + off + head;
        if (op == 0x1) on_text(c, payload, n, recv_ms);
        else if (op == 0x9) { /* ping: answer with a masked pong */
            char pong[6] = {(char)0x8A, (char)0x80, 0, 0, 0, 0};
            if (n == 0) send_all(c->fd, pong, 6);
        } else if (op == 0x8) { client_dead(c); return; } /* 1012 in a storm: come back and resume */
        off += head + n;
    }
    if (off) {
        memmove(c->buf, c->buf + off, c->len - off);
        c->len -= off;
    }
}
static void open_one(Conn *c) {
    c->fd = tcp_connect();
    c->state = C_CONNECTING;
    connecting_now++;
    if (!t_first_connect) t_first_connect = now_mono();
    conn_add(c, EPOLLOUT);
}
static void open_clients(void) {
    while (next_to_open < opt_clients && connecting_now < opt_concurrency) {
        Conn *c = &clients[next_to_open];
        c->kind = K_CLIENT;
        c->index = next_to_open++;
        open_one(c);
    }
    if (!storm_away) return;
    double t = now_mono();
    for (int i = 0; i < opt_clients && connecting_now < opt_concurrency; i++)
        if (clients[i].state == C_AWAY && positions[i].reopen_at <= t) open_one(&clients[i]);
}
static void on_client_writable(Conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) { client_dead(c); return; }
    char req[4096], resume[160] = "";
    Position *at = positions ? &positions[c->index] : NULL;
    if (at && at->client_id[0])
        snprintf(resume, sizeof resume, "&resume=%s&epoch=%s&offset=%ld", at->client_id, at->epoch, at->offset);
    int n = snprintf(req, sizeof req,
                     "GET %s?token=%s%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     opt_path, tokens[c->index], resume, opt_host, opt_port, browser_headers);
    send_all(c->fd, req, n);
    c->state = C_HANDSHAKE;
    conn_mod(c, EPOLLIN);
}

/* ------------------------------------------------------------- HTTP -- */
static Http *posts;
static int n_posts, next_seq, posts_done, post_errors;
static int *retry_q, retry_len, storm_accepted, storm_retries; /* storm: seqs to send again */
static double retry_after;
static void retry_later(int seq) {
    retry_q[retry_len++] = seq;
    storm_retries++;
    retry_after = now_mono() + 0.05;
}
static double *post_ms;
static Http health;
static double *health_ms;
static int n_health, health_cap;
static double *busy_health_ms; /* /health while clients connect (or, in storm mode, through the reload) */
static int n_busy_health, busy_phase;

static void http_open(Http *h, int kind) {
    memset(h, 0, sizeof *h);
    h->c.kind = kind;
    h->c.fd = tcp_connect();
    conn_add(&h->c, EPOLLIN);
}
static void http_reopen(Http *h) {
    /* storm: the old worker went away with this keep-alive connection; what was in flight is sent again */
    int kind = h->c.kind, busy = h->busy, seq = h->seq;
    epoll_ctl(ep, EPOLL_CTL_DEL, h->c.fd, NULL);
    close(h->c.fd);
    free(h->out);
    free(h->c.buf);
    http_open(h, kind);
    if (busy && kind == K_POST) retry_later(seq);
}
static void http_send(Http *h, char *request, size_t n) {
    h->busy = 1;
    h->sent_at = now_mono();
    h->out = request;
    h->out_len = n;
    h->out_off = 0;
    while (h->out_off < h->out_len) {
        ssize_t w = write(h->c.fd, h->out + h->out_off, h->out_len - h->out_off);
        if (w < 0) {
            if (errno == EAGAIN) { conn_mod(&h->c, EPOLLIN | EPOLLOUT); return; }
            if (opt_storm_pid || h->c.kind != K_POST) { http_reopen(h); return; }
            die("http write: %s", strerror(errno));
        }
        h->out_off += w;
    }
}
/* One complete response in h->c.buf? Returns its status (0 = not yet). */
static int http_take_response(Http *h) {
    char *end = memmem(h->c.buf, h->c.len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = end + 4 - h->c.buf;
    long clen = 0;
    char *cl = memmem(h->c.buf, head, "Content-Length:", 15);
    if (!cl) cl = memmem(h->c.buf, head, "content-length:", 15);
    if (cl) clen = strtol(cl + 15, NULL, 10);
    if (h->c.len < head + clen) return 0;
    int status = atoi(h->c.buf + 9);
    memmove(h->c.buf, h->c.buf + head + clen, h->c.len - head - clen);
    h->c.len -= head + clen;
    return status;
}
static char *broadcast_request(int seq, size_t *len) {
    static char *pad = NULL;
    if (!pad) {
        pad = malloc(opt_payload + 1);
        memset(pad, 'x', opt_payload);
        pad[opt_payload] = 0;
    }
    char *body = malloc(opt_payload + 512);
    int bn = snprintf(body, opt_payload + 512,
                      "{\"message\":{\"type\":\"ANNOUNCEMENT\",\"data\":{\"message\":\"bench\",\"seq\":%d,\"t\":%.3f,\"pad\":\"%s\"}},"
                      "\"filter\":{\"channels\":[\"%s\"]}}",
                      seq, now_wall_ms(), pad, opt_channel);
    char *req = malloc(bn + 512);
    char key[96] = "";
    if (opt_storm_pid) snprintf(key, sizeof key, "Idempotency-Key: %s-%d\r\n", run_id, seq); /* retry-safe */
    int n = snprintf(req, bn + 512,
                     "POST /broadcast HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                     opt_host, opt_port, opt_secret, key, bn, body);
    free(body);
    *len = n;
    return req;
}
static void post_seq(Http *h, int seq) {
    size_t n;
    char *req = broadcast_request(seq, &n);
    h->seq = seq;
    http_send(h, req, n);
}
static void post_next(Http *h) {
    if (next_seq == opt_warmup && !t_first_send) t_first_send = now_mono();
    post_seq(h, next_seq++);
}
static Http probe;
static void send_health(void) {
    static char get[256];
    int n = snprintf(get, sizeof get, "GET /health HTTP/1.1\r\nHost: %s:%d\r\n\r\n", opt_host, opt_port);
    http_send(&health, strdup(get), n);
}
static void send_probe(void) {
    char body[256], *req = malloc(1024);
    int bn = snprintf(body, sizeof body,
                      "{\"message\":{\"type\":\"ANNOUNCEMENT\",\"data\":{\"probe\":%d,\"t\":%.3f}},"
                      "\"filter\":{\"channels\":[\"%s\"]}}",
                      probes_sent++, now_wall_ms(), opt_channel);
    int n = snprintf(req, 1024,
                     "POST /broadcast HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                     opt_host, opt_port, opt_secret, bn, body);
    http_send(&probe, req, n);
}
/* While the server is busy (a connect storm, a reload): /health, and probes once someone can receive them. */
static void busy_polls(int probes) {
    static double next_health, next_probe;
    double t = now_mono();
    if (opt_health_ms > 0 && !health.busy && t >= next_health) {
        send_health();
        next_health = t + opt_health_ms / 1e3;
    }
    if (probes && n_subscribed > 0 && !probe.busy && t >= next_probe) {
        send_probe();
        next_probe = t + opt_probe_ms / 1e3;
    }
}
static void on_http(Http *h, uint32_t events) {
    if (events & EPOLLOUT) {
        while (h->out_off < h->out_len) {
            ssize_t w = write(h->c.fd, h->out + h->out_off, h->out_len - h->out_off);
            if (w < 0) {
                if (errno == EAGAIN) return;
                if (opt_storm_pid || h->c.kind != K_POST) { http_reopen(h); return; }
                die("http write: %s", strerror(errno));
            }
            h->out_off += w;
        }
        conn_mod(&h->c, EPOLLIN);
    }
    if (!(events & EPOLLIN)) return;
    ssize_t r = read(h->c.fd, rbuf, sizeof rbuf);
    if (r <= 0) {
        if (r < 0 && errno == EAGAIN) return;
        /* the old worker left (storm), or an idle keep-alive timed out: connect again */
        if (opt_storm_pid || h->c.kind != K_POST || !h->busy) { http_reopen(h); return; }
        die("the server closed an HTTP connection");
    }
    buf_append(&h->c, rbuf, r);
    int status;
    while ((status = http_take_response(h))) {
        double took = (now_mono() - h->sent_at) * 1e3;
        h->busy = 0;
        free(h->out);
        h->out = NULL;
        if (h->c.kind == K_HEALTH) {
            if (busy_phase) { if (n_busy_health < health_cap) busy_health_ms[n_busy_health++] = took; }
            else if (n_health < health_cap) health_ms[n_health++] = took;
            if (status != 200) post_errors++;
        } else if (h->c.kind == K_PROBE) {
            if (status == 200) probes_ok++;
            else post_errors++;
        } else if (opt_storm_pid) {
            if (status == 200) storm_accepted++;
            else retry_later(h->seq); /* 503 while the old worker drains: the same key again */
        } else {
            if (status != 200) post_errors++;
            if (posts_done < opt_warmup + opt_broadcasts) post_ms[posts_done] = took;
            posts_done++;
        }
    }
}

/* ------------------------------------------------------------ report -- */
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double pct(double *v, long n, double p) {
    if (n == 0) return 0;
    long i = (long)(p / 100.0 * (n - 1) + 0.5);
    return v[i];
}

static void wait_events(double timeout_s) {
    struct epoll_event evs[512];
    int n = epoll_wait(ep, evs, 512, (int)(timeout_s * 1000));
    for (int i = 0; i < n; i++) {
        Conn *c = evs[i].data.ptr;
        if (c->kind == K_CLIENT) {
            if (c->state == C_DEAD) continue;
            if (c->state == C_CONNECTING) on_client_writable(c);
            else on_client_data(c);
        } else on_http((Http *)c, evs[i].events);
    }
}

/* CPU seconds of a gunicorn master and its workers, the ones it has already reaped included. */
static double tree_cpu(int master) {
    char path[64], buf[4096];
    long tick = sysconf(_SC_CLK_TCK);
    double total = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", master);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fgets(buf, sizeof buf, f)) {
            char *q = strrchr(buf, ')');
            unsigned long ut = 0, st = 0;
            long cut = 0, cst = 0;
            if (q && sscanf(q + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %ld %ld", &ut, &st, &cut, &cst) == 4)
                total += (double)(ut + st + cut + cst) / tick;
        }
        fclose(f);
    }
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", master, master);
    f = fopen(path, "r");
    if (f) {
        int child;
        while (fscanf(f, "%d", &child) == 1) {
            char cpath[64], cbuf[4096];
            snprintf(cpath, sizeof cpath, "/proc/%d/stat", child);
            FILE *cf = fopen(cpath, "r");
            if (!cf) continue;
            if (fgets(cbuf, sizeof cbuf, cf)) {
                char *q = strrchr(cbuf, ')');
                unsigned long ut = 0, st = 0;
                if (q && sscanf(q + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2)
                    total += (double)(ut + st) / tick;
            }
            fclose(cf);
        }
        fclose(f);
    }
    return total;
}

/* The reconnect storm: broadcasts flow, a SIGHUP closes every socket with 1012, everyone resumes. */
static int storm(double deadline, double connect_s, double rss1, double rss0, const char *error) {
    n_posts = 16;
    posts = calloc(n_posts, sizeof *posts);
    for (int i = 0; i < n_posts; i++) http_open(&posts[i], K_POST);
    long expected = (long)n_subscribed * total_seqs;
    double start = now_mono(), cpu_start = tree_cpu(opt_storm_pid), cpu_hup = 0, cpu_back = 0;
    double last_progress = start;
    long last_delivered = 0;
    busy_phase = 1;
    n_busy_health = 0; /* the reload only */
    while (now_mono() < deadline) {
        double t = now_mono();
        open_clients();
        busy_polls(0);
        if (!t_hup && t >= start + opt_storm_after_ms / 1e3) {
            cpu_hup = tree_cpu(opt_storm_pid);
            kill(opt_storm_pid, SIGHUP);
            t_hup = t;
        }
        if (t_hup && !cpu_back && storm_away == 0 && t_last_back > t_hup) cpu_back = tree_cpu(opt_storm_pid);
        for (int i = 0; i < n_posts; i++) {
            Http *h = &posts[i];
            if (h->busy) continue;
            if (retry_len && t >= retry_after) post_seq(h, retry_q[--retry_len]);
            else if (next_seq < total_seqs && t >= start + next_seq / (double)opt_storm_rate) post_next(h);
        }
        if (delivered != last_delivered) { last_delivered = delivered; last_progress = t; }
        if (storm_accepted >= total_seqs && storm_away == 0 && t_hup && delivered >= expected) break;
        if (t - last_progress > opt_drain_ms / 1e3 && next_seq >= total_seqs && !retry_len) {
            error = "drain timeout";
            break;
        }
        wait_events(0.002);
    }
    double end = now_mono(), cpu_end = tree_cpu(opt_storm_pid);
    qsort(busy_health_ms, n_busy_health, sizeof(double), cmp_double);
    if (getenv("LOADGEN_SHOW_LOSS")) { /* which (client, seq) never arrived: for debugging */
        int shown = 0;
        for (int i = 0; i < opt_clients && shown < 40; i++)
            for (int s = 0; s < total_seqs && shown < 40; s++)
                if (!seen[(size_t)i * total_seqs + s]) {
                    fprintf(stderr, "lost: client %d seq %d (client offset %ld, connected at %ld)\n", i, s,
                            positions[i].offset, positions[i].connected_at_offset);
                    shown++;
                }
    }
    if (!cpu_back) cpu_back = cpu_end;
    int replayed_max = 0, reconnected = 0;
    for (int i = 0; i < opt_clients; i++) {
        if (positions[i].replayed > replayed_max) replayed_max = positions[i].replayed;
    }
    reconnected = (int)(storm_recovered + storm_not_recovered);
    if (!error && storm_away) error = "not every client came back";
    double back_s = t_last_back > t_hup ? t_last_back - t_hup : 0;
    printf("{\"mode\":\"storm\",\"clients\":%d,\"connected\":%d,\"connect_s\":%.3f,\"server_kb_per_conn\":%.2f,"
           "\"storm_rate\":%d,\"broadcasts\":%d,\"accepted\":%d,\"post_retries\":%d,"
           "\"reconnected\":%d,\"recovered\":%ld,\"not_recovered\":%ld,\"still_away\":%ld,"
           "\"back_s\":%.3f,\"replayed_total\":%ld,\"replayed_mean\":%.2f,\"replayed_max\":%d,"
           "\"expected\":%ld,\"delivered\":%ld,\"loss\":%ld,\"duplicates\":%ld,\"unexpected_frames\":%ld,"
           "\"server_cpu_storm_pct\":%.1f,\"server_cpu_before_pct\":%.1f,\"run_s\":%.2f,"
           "\"storm_health_samples\":%d,\"storm_health_p99_ms\":%.3f,\"storm_health_max_ms\":%.3f,"
           "\"error\":%s%s%s}\n",
           opt_clients, n_connected, connect_s, n_subscribed ? (rss1 - rss0) * 1024.0 / n_subscribed : 0,
           opt_storm_rate, total_seqs, storm_accepted, storm_retries, reconnected, storm_recovered,
           storm_not_recovered, storm_away, back_s, storm_replayed,
           reconnected ? (double)storm_replayed / reconnected : 0, replayed_max, expected, delivered,
           expected - delivered, duplicates, unexpected,
           back_s > 0 ? (cpu_back - cpu_hup) / back_s * 100 : 0,
           t_hup > start ? (cpu_hup - cpu_start) / (t_hup - start) * 100 : 0, end - start, n_busy_health,
           pct(busy_health_ms, n_busy_health, 99), n_busy_health ? busy_health_ms[n_busy_health - 1] : 0,
           error ? "\"" : "", error ? error : "null", error ? "\"" : "");
    return error ? 1 : 0;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT_S(name, var) if (!strcmp(a, name) && v) { var = v; i++; continue; }
#define OPT_I(name, var) if (!strcmp(a, name) && v) { var = atoi(v); i++; continue; }
        OPT_S("--host", opt_host) OPT_S("--path", opt_path) OPT_S("--tokens", opt_tokens)
        OPT_S("--channel", opt_channel) OPT_S("--admin-secret", opt_secret) OPT_S("--pids", opt_pids)
        OPT_S("--extra-pids", opt_extra_pids)
        OPT_I("--port", opt_port) OPT_I("--clients", opt_clients) OPT_I("--concurrency", opt_concurrency)
        OPT_I("--broadcasts", opt_broadcasts) OPT_I("--interval-ms", opt_interval_ms) OPT_I("--warmup", opt_warmup)
        OPT_I("--payload-bytes", opt_payload) OPT_I("--drain-timeout-ms", opt_drain_ms)
        OPT_I("--max-run-s", opt_max_run_s) OPT_I("--health-every-ms", opt_health_ms)
        OPT_I("--probe-every-ms", opt_probe_ms) OPT_I("--browser-headers", opt_browser)
        OPT_I("--storm-hup-pid", opt_storm_pid) OPT_I("--storm-rate", opt_storm_rate)
        OPT_I("--storm-seconds", opt_storm_seconds) OPT_I("--storm-after-ms", opt_storm_after_ms)
        die("unknown or incomplete option %s (see the comment at the top of bench/loadgen.c)", a);
    }
    if (strcmp(opt_host, "127.0.0.1")) die("--host must be 127.0.0.1 (benchmarks stay on loopback)");
    if (!opt_tokens) die("--tokens FILE is required");
    if (opt_browser) snprintf(browser_headers, sizeof browser_headers, BROWSER_HEADERS, opt_port);
    signal(SIGPIPE, SIG_IGN); /* a closed connection is an error to handle, not a reason to die */
    rng ^= (uint64_t)getpid() << 17 ^ (uint64_t)now_wall_ms();
    if (opt_storm_pid) {
        opt_warmup = 0;
        opt_broadcasts = opt_storm_rate * opt_storm_seconds;
        snprintf(run_id, sizeof run_id, "storm-%d-%ld", getpid(), (long)now_wall_ms());
    }

    if (opt_probe_ms > 0) { /* the connect storm: its probes are the only broadcasts */
        if (opt_storm_pid) die("--probe-every-ms and --storm-hup-pid are separate runs");
        opt_broadcasts = 0;
        opt_warmup = 0;
    }

    tokens = calloc(opt_clients, sizeof *tokens);
    FILE *tf = fopen(opt_tokens, "r");
    if (!tf) die("cannot read %s", opt_tokens);
    char line[4096];
    for (int i = 0; i < opt_clients; i++) {
        if (!fgets(line, sizeof line, tf)) die("%s has fewer than %d tokens", opt_tokens, opt_clients);
        line[strcspn(line, "\r\n")] = 0;
        tokens[i] = strdup(line);
    }
    fclose(tf);

    total_seqs = opt_warmup + opt_broadcasts;
    clients = calloc(opt_clients, sizeof *clients);
    seen = calloc((size_t)opt_clients * total_seqs, 1);
    latencies = malloc(sizeof(double) * (size_t)opt_clients * opt_broadcasts + 1);
    post_ms = calloc(total_seqs + 1, sizeof(double));
    health_cap = 100000;
    health_ms = malloc(sizeof(double) * health_cap);
    busy_health_ms = malloc(sizeof(double) * health_cap);
    probe_cap = opt_probe_ms > 0 ? (long)opt_clients * 2000 : 0;
    probe_lat = malloc(sizeof(double) * (probe_cap + 1));
    ep = epoll_create1(0);
    if (opt_storm_pid) {
        positions = calloc(opt_clients, sizeof *positions);
        retry_q = malloc(sizeof(int) * 1000000);
    }
    double deadline = now_mono() + opt_max_run_s;
    const char *error = NULL;

    /* 1. connect and subscribe */
    double rss0, cpu0, x0;
    proc_usage(opt_pids, &rss0, &cpu0);
    (void)x0;
    double lg0 = self_cpu();
    http_open(&health, K_HEALTH);
    if (opt_probe_ms > 0) http_open(&probe, K_PROBE);
    busy_phase = opt_probe_ms > 0;
    while (n_subscribed + n_dead < opt_clients && now_mono() < deadline) {
        open_clients();
        if (busy_phase) busy_polls(1);
        wait_events(busy_phase ? 0.005 : 0.05);
    }
    while ((health.busy || probe.busy) && now_mono() < deadline) wait_events(0.01);
    busy_phase = 0;
    double connect_s = t_all_connected - t_first_connect;
    double subscribe_s = t_all_subscribed - t_first_sub;
    double rss1, cpu1;
    proc_usage(opt_pids, &rss1, &cpu1);
    double lg1 = self_cpu();
    if (n_subscribed < opt_clients) error = "not every client connected and subscribed";
    if (opt_storm_pid) return storm(deadline, connect_s, rss1, rss0, error);

    /* 2. warm-up, then the measured broadcasts */
    n_posts = opt_interval_ms > 0 ? 64 : 1;
    posts = calloc(n_posts, sizeof *posts);
    for (int i = 0; i < n_posts; i++) http_open(&posts[i], K_POST);
    while (next_seq < opt_warmup && now_mono() < deadline) {
        if (!posts[0].busy) post_next(&posts[0]);
        wait_events(0.01);
    }
    double warm_deadline = now_mono() + 10;
    while ((posts[0].busy || warm_delivered < (long)n_subscribed * opt_warmup) && now_mono() < warm_deadline)
        wait_events(0.01);

    double rss2, cpu2, xr2 = 0, xc2 = 0;
    proc_usage(opt_pids, &rss2, &cpu2);
    if (*opt_extra_pids) proc_usage(opt_extra_pids, &xr2, &xc2);
    double lg2 = self_cpu();
    long expected = (long)n_subscribed * opt_broadcasts;
    double start = now_mono(), last_progress = start, next_health = start;
    long last_delivered = 0;
    t_first_send = 0;
    while (now_mono() < deadline) {
        double t = now_mono();
        if (next_seq < total_seqs) {
            if (opt_interval_ms == 0) {
                if (!posts[0].busy) post_next(&posts[0]);
            } else {
                while (next_seq < total_seqs && t >= start + (next_seq - opt_warmup) * opt_interval_ms / 1e3) {
                    Http *idle = NULL;
                    for (int i = 0; i < n_posts; i++) if (!posts[i].busy) { idle = &posts[i]; break; }
                    if (!idle) break;
                    post_next(idle);
                }
            }
        }
        if (opt_health_ms > 0 && !health.busy && t >= next_health) {
            send_health();
            next_health = t + opt_health_ms / 1e3;
        }
        if (delivered != last_delivered) { last_delivered = delivered; last_progress = t; }
        if (delivered >= expected && posts_done >= total_seqs) break;
        if (t - last_progress > opt_drain_ms / 1e3 && next_seq >= total_seqs) { error = "drain timeout"; break; }
        wait_events(opt_interval_ms > 0 ? 0.001 : 0.005);
    }
    while (health.busy && now_mono() < deadline) wait_events(0.01);
    double fanout_s = t_last_recv - t_first_send;
    double rss3, cpu3, xr3 = 0, xc3 = 0;
    proc_usage(opt_pids, &rss3, &cpu3);
    if (*opt_extra_pids) proc_usage(opt_extra_pids, &xr3, &xc3);
    double lg3 = self_cpu();
    double wall = now_mono() - start;

    qsort(latencies, n_lat, sizeof(double), cmp_double);
    qsort(health_ms, n_health, sizeof(double), cmp_double);
    qsort(busy_health_ms, n_busy_health, sizeof(double), cmp_double);
    qsort(probe_lat, n_probe_lat, sizeof(double), cmp_double);
    qsort(post_ms + opt_warmup, opt_broadcasts, sizeof(double), cmp_double);
    double mean = 0;
    for (long i = 0; i < n_lat; i++) mean += latencies[i];
    mean = n_lat ? mean / n_lat : 0;

    printf("{\"clients\":%d,\"broadcasts\":%d,\"interval_ms\":%d,\"payload_bytes\":%d,\"connected\":%d,"
           "\"subscribed\":%d,\"dead\":%d,\"expected\":%ld,\"delivered\":%ld,\"loss\":%ld,\"duplicates\":%ld,"
           "\"unexpected_frames\":%ld,\"post_errors\":%d,"
           "\"connect_s\":%.3f,\"subscribe_s\":%.3f,\"fanout_s\":%.4f,\"deliveries_per_s\":%.0f,"
           "\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,\"mean_ms\":%.3f,"
           "\"post_p50_ms\":%.3f,\"post_p99_ms\":%.3f,\"post_max_ms\":%.3f,"
           "\"health_samples\":%d,\"health_p50_ms\":%.3f,\"health_p99_ms\":%.3f,\"health_max_ms\":%.3f,"
           "\"connect_health_samples\":%d,\"connect_health_p99_ms\":%.3f,\"connect_health_max_ms\":%.3f,"
           "\"probes\":%d,\"probes_accepted\":%d,\"probe_receptions\":%ld,\"probe_p50_ms\":%.3f,"
           "\"probe_p99_ms\":%.3f,\"probe_max_ms\":%.3f,"
           "\"server_rss_before_mb\":%.2f,\"server_rss_connected_mb\":%.2f,\"server_rss_after_mb\":%.2f,"
           "\"server_kb_per_conn\":%.2f,\"server_cpu_connect_s\":%.3f,\"server_cpu_fanout_pct\":%.1f,"
           "\"extra_cpu_fanout_pct\":%.1f,\"loadgen_cpu_connect_pct\":%.1f,\"loadgen_cpu_fanout_pct\":%.1f,"
           "\"error\":%s%s%s}\n",
           opt_clients, opt_broadcasts, opt_interval_ms, opt_payload, n_connected, n_subscribed, n_dead, expected,
           delivered, expected - delivered, duplicates, unexpected, post_errors, connect_s, subscribe_s, fanout_s,
           fanout_s > 0 ? delivered / fanout_s : 0, pct(latencies, n_lat, 50), pct(latencies, n_lat, 90),
           pct(latencies, n_lat, 99), n_lat ? latencies[n_lat - 1] : 0, mean, pct(post_ms + opt_warmup, opt_broadcasts, 50),
           pct(post_ms + opt_warmup, opt_broadcasts, 99),
           total_seqs ? post_ms[total_seqs - 1] : 0, n_health, pct(health_ms, n_health, 50),
           pct(health_ms, n_health, 99), n_health ? health_ms[n_health - 1] : 0, n_busy_health,
           pct(busy_health_ms, n_busy_health, 99), n_busy_health ? busy_health_ms[n_busy_health - 1] : 0, probes_sent,
           probes_ok, n_probe_lat, pct(probe_lat, n_probe_lat, 50), pct(probe_lat, n_probe_lat, 99),
           n_probe_lat ? probe_lat[n_probe_lat - 1] : 0, rss0, rss1, rss3,
           n_subscribed ? (rss1 - rss0) * 1024.0 / n_subscribed : 0, cpu1 - cpu0,
           wall > 0 ? (cpu3 - cpu2) / wall * 100 : 0, wall > 0 ? (xc3 - xc2) / wall * 100 : 0,
           connect_s > 0 ? (lg1 - lg0) / (t_all_subscribed - t_first_connect) * 100 : 0,
           wall > 0 ? (lg3 - lg2) / wall * 100 : 0, error ? "\"" : "", error ? error : "null", error ? "\"" : "");
    return error ? 1 : 0;
}
