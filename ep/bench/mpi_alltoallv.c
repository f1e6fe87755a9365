/*
 * OpenMPI baseline for moe-bench: the same deduplicated dispatch and combine
 * byte movement, done with MPI_Alltoallv.
 *
 * Input: a byte-matrix file written by `moe-bench --write-matrix FILE`:
 *   line 1: "kvmesh-ep-matrix 1 N"
 *   then N lines of N integers: dispatch bytes sent from rank i to rank j
 *   then N lines of N integers: combine  bytes sent from rank i to rank j
 * (self entries included: moe-bench copies those locally, MPI does too).
 *
 * Each iteration, as moe-bench does: sleep 1 ms, MPI_Barrier twice, time
 * dispatch (MPI_Alltoallv); sleep 1 ms, MPI_Barrier twice, time combine. Per iteration the maximum over ranks is
 * taken (MPI_Reduce MAX); rank 0 prints one JSON object with p50/p99.
 *
 * Build: mpicc -O2 -o mpi_alltoallv mpi_alltoallv.c
 * Run:   mpirun --allow-run-as-root --oversubscribe -np N --mca btl self,vader \
 *            ./mpi_alltoallv MATRIX [ITERS] [WARMUP]
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array (same rule as moe-bench). */
static double pct(const double *sorted, int n, double p) {
    int idx = (int)((p / 100.0) * n + 0.999999) - 1;
    if (idx < 0) idx = 0;
    if (idx >= n) idx = n - 1;
    return sorted[idx];
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int me, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (argc < 2) {
        if (me == 0) fprintf(stderr, "usage: %s MATRIX [ITERS] [WARMUP]\n", argv[0]);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int iters = argc > 2 ? atoi(argv[2]) : 50;
    int warmup = argc > 3 ? atoi(argv[3]) : 5;
    FILE *f = fopen(argv[1], "r");
    if (!f) { perror(argv[1]); MPI_Abort(MPI_COMM_WORLD, 2); }
    char magic[64];
    int ver = 0, fn = 0;
    if (fscanf(f, "%63s %d %d", magic, &ver, &fn) != 3 || strcmp(magic, "kvmesh-ep-matrix") != 0 ||
        ver != 1 || fn != n) {
        fprintf(stderr, "rank %d: bad matrix header or rank count (file %d, mpirun %d)\n", me, fn, n);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    long long *disp = calloc((size_t)n * n, sizeof(long long));
    long long *comb = calloc((size_t)n * n, sizeof(long long));
    for (int i = 0; i < n * n; i++)
        if (fscanf(f, "%lld", &disp[i]) != 1) { fprintf(stderr, "short matrix\n"); MPI_Abort(MPI_COMM_WORLD, 2); }
    for (int i = 0; i < n * n; i++)
        if (fscanf(f, "%lld", &comb[i]) != 1) { fprintf(stderr, "short matrix\n"); MPI_Abort(MPI_COMM_WORLD, 2); }
    fclose(f);

    /* Per phase: send counts = row me, receive counts = column me. */
    int *sc[2], *sd[2], *rc[2], *rd[2];
    char *sbuf[2], *rbuf[2];
    long long sent_remote[2] = {0, 0};
    for (int ph = 0; ph < 2; ph++) {
        long long *m = ph == 0 ? disp : comb;
        sc[ph] = calloc(n, sizeof(int)); sd[ph] = calloc(n, sizeof(int));
        rc[ph] = calloc(n, sizeof(int)); rd[ph] = calloc(n, sizeof(int));
        long long so = 0, ro = 0;
        for (int j = 0; j < n; j++) {
            sc[ph][j] = (int)m[(size_t)me * n + j]; sd[ph][j] = (int)so; so += sc[ph][j];
            rc[ph][j] = (int)m[(size_t)j * n + me]; rd[ph][j] = (int)ro; ro += rc[ph][j];
            if (j != me) sent_remote[ph] += sc[ph][j];
        }
        sbuf[ph] = malloc(so ? so : 1);
        rbuf[ph] = malloc(ro ? ro : 1);
        memset(sbuf[ph], 0x5a + me, so ? so : 1);
        memset(rbuf[ph], 0, ro ? ro : 1);
    }

    double *t[2];
    t[0] = calloc(iters, sizeof(double));
    t[1] = calloc(iters, sizeof(double));
    for (int it = -warmup; it < iters; it++) {
        for (int ph = 0; ph < 2; ph++) {
            usleep(1000);
            MPI_Barrier(MPI_COMM_WORLD);
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            MPI_Alltoallv(sbuf[ph], sc[ph], sd[ph], MPI_BYTE, rbuf[ph], rc[ph], rd[ph], MPI_BYTE,
                          MPI_COMM_WORLD);
            double dt = (MPI_Wtime() - t0) * 1e6, mx = 0;
            MPI_Reduce(&dt, &mx, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
            if (it >= 0) t[ph][it] = mx;
        }
    }
    /* Check the received bytes: every source fills with 0x5a + its rank. */
    int bad = 0;
    for (int ph = 0; ph < 2; ph++)
        for (int j = 0; j < n; j++)
            for (int b = 0; b < rc[ph][j]; b++)
                if ((unsigned char)rbuf[ph][rd[ph][j] + b] != (unsigned char)(0x5a + j)) { bad = 1; break; }
    int anybad = 0;
    MPI_Reduce(&bad, &anybad, 1, MPI_INT, MPI_MAX, 0, MPI_COMM_WORLD);
    long long maxsent[2];
    MPI_Reduce(sent_remote, maxsent, 2, MPI_LONG_LONG, MPI_MAX, 0, MPI_COMM_WORLD);
    if (me == 0) {
        qsort(t[0], iters, sizeof(double), cmp_double);
        qsort(t[1], iters, sizeof(double), cmp_double);
        printf("{\"impl\":\"openmpi\",\"ranks\":%d,\"iters\":%d,"
               "\"dispatch_p50_us\":%.1f,\"dispatch_p99_us\":%.1f,"
               "\"combine_p50_us\":%.1f,\"combine_p99_us\":%.1f,"
               "\"dispatch_remote_bytes_max_rank\":%lld,\"combine_remote_bytes_max_rank\":%lld,"
               "\"verified\":%s}\n",
               n, iters, pct(t[0], iters, 50), pct(t[0], iters, 99), pct(t[1], iters, 50),
               pct(t[1], iters, 99), maxsent[0], maxsent[1], anybad ? "false" : "true");
    }
    MPI_Finalize();
    return 0;
}
