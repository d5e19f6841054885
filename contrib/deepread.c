/* deepread.c -- reads every regular file below DIR as fast as the device allows: T reader
 * threads taking files biggest first, 1 MiB reads, and (AHEAD > 0) one hinter thread that
 * keeps posix_fadvise(WILLNEED) up to AHEAD MiB in front of the readers.  Used by
 * bench-restore-incremental.sh to measure the floor of an incremental restore (it must read
 * the whole destination).  Build: cc -O2 -pthread -o deepread deepread.c
 * Files are cut into pieces of CHUNK_MIB, so several threads share a big file; AHEAD_MIB -1:
 * no hinter, each reader hints its whole piece before reading it.
 * Usage: deepread DIR [T=8] [AHEAD_MIB=256] [BUF_KIB=1024] [CHUNK_MIB=32] -> bytes read */
#define _GNU_SOURCE
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct { char *path; long long size; } F;
typedef struct { size_t f; long long off, len; } W;
static W *work; static size_t nwork;
static F *files; static size_t nfiles, cap;
static atomic_size_t next_read, next_hint;
static atomic_llong done_bytes, hinted_bytes;
static long long ahead; static size_t buf;

static int add(const char *p, const struct stat *st, int flag, struct FTW *f) {
  (void)f;
  if (flag != FTW_F || !S_ISREG(st->st_mode)) return 0;
  if (nfiles == cap) { cap = cap ? cap * 2 : 1024; files = realloc(files, cap * sizeof(F)); }
  files[nfiles].path = strdup(p); files[nfiles].size = st->st_size; nfiles++;
  return 0;
}
static int cmp(const void *a, const void *b) {
  long long x = ((const F *)a)->size, y = ((const F *)b)->size;
  return x < y ? 1 : x > y ? -1 : 0;
}
static void *hinter(void *arg) {
  (void)arg;
  for (;;) {
    size_t i = atomic_fetch_add(&next_hint, 1);
    if (i >= nwork) return NULL;
    while (atomic_load(&hinted_bytes) - atomic_load(&done_bytes) > ahead) usleep(500);
    int fd = open(files[work[i].f].path, O_RDONLY);
    if (fd >= 0) { posix_fadvise(fd, work[i].off, work[i].len, POSIX_FADV_WILLNEED); close(fd); }
    atomic_fetch_add(&hinted_bytes, work[i].len);
  }
}
static void *reader(void *arg) {
  (void)arg;
  char *b = malloc(buf);
  for (;;) {
    size_t i = atomic_fetch_add(&next_read, 1);
    if (i >= nwork) break;
    int fd = open(files[work[i].f].path, O_RDONLY);
    if (fd < 0) continue;
    ssize_t n; long long off = work[i].off, end = off + work[i].len;
    if (ahead < 0) posix_fadvise(fd, off, work[i].len, POSIX_FADV_WILLNEED);
    while (off < end && (n = pread(fd, b, buf, off)) > 0) { off += n; atomic_fetch_add(&done_bytes, n); }
    close(fd);
  }
  free(b);
  return NULL;
}
int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: deepread DIR [T] [AHEAD_MIB] [BUF_KIB]\n"); return 2; }
  int t = argc > 2 ? atoi(argv[2]) : 8;
  ahead = (argc > 3 ? atoll(argv[3]) : 256) << 20;
  buf = (size_t)(argc > 4 ? atoi(argv[4]) : 1024) << 10;
  long long chunk = (argc > 5 ? atoll(argv[5]) : 32) << 20;
  if (nftw(argv[1], add, 64, FTW_PHYS)) { perror(argv[1]); return 1; }
  qsort(files, nfiles, sizeof(F), cmp);
  for (size_t i = 0; i < nfiles; i++)
    for (long long o = 0; o < files[i].size || (o == 0 && files[i].size == 0); o += chunk) {
      if (nwork % 1024 == 0) work = realloc(work, (nwork + 1024) * sizeof(W));
      long long l = files[i].size - o < chunk ? files[i].size - o : chunk;
      work[nwork++] = (W){i, o, l};
      if (files[i].size == 0) break;
    }
  pthread_t h, r[256];
  if (t > 256) t = 256;
  if (ahead > 0) pthread_create(&h, NULL, hinter, NULL);
  for (int k = 0; k < t; k++) pthread_create(&r[k], NULL, reader, NULL);
  for (int k = 0; k < t; k++) pthread_join(r[k], NULL);
  if (ahead > 0) { atomic_store(&next_hint, nwork); pthread_join(h, NULL); }
  printf("%lld\n", (long long)atomic_load(&done_bytes));
  return 0;
}
