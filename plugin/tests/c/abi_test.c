/* The kvmesh C ABI from C: dlopen libkvmesh.so, get the function table,
 * register host KV caches in two contexts, push blocks from one to the
 * other (loopback), check every byte; then the peer store (ABI 1.1): two
 * store contexts form a swarm, a host KV cache saves blocks, looks them up
 * and loads them into other blocks, layer by layer, and every byte is
 * checked; then misuse every kind of argument and check that each call
 * answers an error status instead of crashing.
 *
 * Usage: abi_test /path/to/libkvmesh.so
 * Built and run by plugin/cabi/tests/c_program.rs. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvmesh.h"

typedef KvmeshStatus (*get_api_fn)(uint32_t, uint32_t, KvmeshApi *);

static KvmeshApi api;
static int checks = 0;

static const char *last_error(void) {
  static char buf[1024];
  size_t n = 0;
  buf[0] = 0;
  api.last_error(buf, sizeof buf, &n);
  return buf;
}

#define CHECK(cond)                                                        \
  do {                                                                     \
    checks++;                                                              \
    if (!(cond)) {                                                         \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__,    \
              #cond);                                                      \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

/* A call must return `want`; on an error status the last error must be set. */
#define EXPECT(call, want)                                                 \
  do {                                                                     \
    KvmeshStatus got_ = (call);                                            \
    checks++;                                                              \
    if (got_ != (want)) {                                                  \
      fprintf(stderr, "%s:%d: %s returned %d, expected %d (%s)\n",         \
              __FILE__, __LINE__, #call, (int)got_, (int)(want),           \
              last_error());                                               \
      exit(1);                                                             \
    }                                                                      \
    if ((want) < 0 && last_error()[0] == 0) {                              \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__,    \
              __LINE__, #call);                                            \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

enum { LAYERS = 2, TOKENS = 4, HEADS = 2, HEAD = 8, ELEM = 2 };
enum { VEC = HEAD * ELEM };

/* vLLM FlashAttention, NHD, per layer: (2, blocks, tokens, heads, head). */
static KvmeshLayoutSpec flash_spec(uint32_t blocks) {
  KvmeshLayoutSpec s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  s.num_layers = LAYERS;
  s.num_blocks = blocks;
  s.block_size = TOKENS;
  s.num_kv_heads = HEADS;
  s.head_size = HEAD;
  s.dtype = KVMESH_DTYPE_F16;
  s.kind = KVMESH_KIND_KEY_VALUE;
  s.placement = KVMESH_PLACEMENT_PER_LAYER;
  s.head_stride = VEC;
  s.token_stride = HEADS * VEC;
  s.block_stride = TOKENS * HEADS * VEC;
  s.kv_stride = (uint64_t)blocks * TOKENS * HEADS * VEC;
  return s;
}

static size_t vec_offset(const KvmeshLayoutSpec *s, uint32_t block, int kv,
                         int t, int h) {
  return block * s->block_stride + kv * s->kv_stride + t * s->token_stride +
         h * s->head_stride;
}

struct host_cache {
  KvmeshLayoutSpec spec;
  KvmeshLayout layout;
  uint8_t *mem[LAYERS];
  uint64_t len[LAYERS];
  KvmeshKvCache cache;
};

static void make_cache(struct host_cache *c, KvmeshContext ctx, uint32_t blocks,
                       unsigned seed) {
  size_t n = 0;
  c->spec = flash_spec(blocks);
  EXPECT(api.layout_create(&c->spec, &c->layout), KVMESH_STATUS_OK);
  EXPECT(api.layout_region_lens(c->layout, c->len, LAYERS, &n), KVMESH_STATUS_OK);
  CHECK(n == LAYERS);
  CHECK(c->len[0] == 2ull * blocks * TOKENS * HEADS * VEC);
  void *bases[LAYERS];
  for (int l = 0; l < LAYERS; l++) {
    c->mem[l] = malloc(c->len[l]);
    CHECK(c->mem[l] != NULL);
    for (uint64_t i = 0; i < c->len[l]; i++)
      c->mem[l][i] = (uint8_t)(i * 7 + l * 13 + seed);
    bases[l] = c->mem[l];
  }
  EXPECT(api.kv_cache_register(ctx, c->layout, bases, c->len, LAYERS,
                               KVMESH_MEMORY_HOST, 0, &c->cache),
         KVMESH_STATUS_OK);
}

/* ---- ABI 1.1: the peer store ---- */
static KvmeshContext store_context(uint64_t mem, const char *bootstrap) {
  KvmeshStoreConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.struct_size = sizeof cfg;
  cfg.mem_bytes = mem;
  cfg.bootstrap = bootstrap;
  KvmeshContext c = 0;
  EXPECT(api.store_context_create(&cfg, &c), KVMESH_STATUS_OK);
  return c;
}

static void store_round_trip(void) {
  /* A peer that holds objects, and a worker that joins through it. */
  KvmeshContext holder = store_context(16u << 20, NULL);
  size_t n = 0;
  EXPECT(api.store_addrs(holder, NULL, 0, &n), KVMESH_STATUS_BUFFER_TOO_SMALL);
  char *boot = malloc(n + 1);
  EXPECT(api.store_addrs(holder, boot, n + 1, &n), KVMESH_STATUS_OK);
  CHECK(strstr(boot, "/p2p/") != NULL);
  KvmeshContext worker = store_context(0, boot);
  EXPECT(api.store_wait_members(worker, 1, 10000), KVMESH_STATUS_OK);

  struct host_cache c;
  make_cache(&c, worker, 10, 42);

  /* Keys of 5 full blocks (and a partial one, which has no key). */
  uint32_t tokens[5 * TOKENS + 2];
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; i++)
    tokens[i] = (uint32_t)(1000 + 3 * i);
  KvmeshNamespace ns;
  memset(&ns, 0, sizeof ns);
  ns.struct_size = sizeof ns;
  ns.model_id = "c-test-model";
  KvmeshBlockKey keys[8];
  EXPECT(api.block_keys_from_tokens(c.layout, &ns, tokens, sizeof tokens / sizeof tokens[0],
                                    keys, 8, &n),
         KVMESH_STATUS_OK);
  CHECK(n == 5);

  /* Save blocks 6, 1, 3 under keys 0..2, signalling each layer. */
  const uint32_t sb[3] = {6, 1, 3};
  KvmeshOp op = 0;
  EXPECT(api.save(c.cache, sb, keys, 3, KVMESH_SAVE_PER_LAYER, 0, &op), KVMESH_STATUS_OK);
  for (uint32_t l = 0; l < LAYERS; l++) EXPECT(api.save_layer(op, l), KVMESH_STATUS_OK);
  KvmeshOpStatus st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  EXPECT(api.op_wait(op, 10000, &st), KVMESH_STATUS_OK);
  const uint64_t block_bytes = (uint64_t)LAYERS * 2 * TOKENS * HEADS * VEC;
  CHECK(st.bytes == 3 * block_bytes && st.failed_blocks == 0);
  EXPECT(api.op_release(op), KVMESH_STATUS_OK);

  /* Look up all 5 keys: the stored prefix is 3 blocks, leased. */
  KvmeshLookup lk = 0;
  size_t found = 0;
  EXPECT(api.lookup(c.cache, keys, 5, 0, 10000, &lk, &found), KVMESH_STATUS_OK);
  CHECK(found == 3);

  /* Load them into blocks 9, 0, 4, layer by layer. */
  const uint32_t db[3] = {9, 0, 4};
  uint8_t *before[LAYERS];
  for (int l = 0; l < LAYERS; l++) {
    before[l] = malloc(c.len[l]);
    memcpy(before[l], c.mem[l], c.len[l]);
  }
  KvmeshOp ld = 0;
  EXPECT(api.load(lk, 0, db, 3, &ld), KVMESH_STATUS_OK);
  for (uint32_t l = 0; l < LAYERS; l++) EXPECT(api.layer_ready(ld, l, 10000), KVMESH_STATUS_OK);
  EXPECT(api.op_wait(ld, 10000, &st), KVMESH_STATUS_OK);
  CHECK(st.bytes == 3 * block_bytes && st.failed_blocks == 0);

  /* Every byte: the destination blocks hold the saved ones, the rest of
   * the cache is unchanged. */
  for (int i = 0; i < 3; i++)
    for (int l = 0; l < LAYERS; l++)
      for (int kv = 0; kv < 2; kv++)
        for (int t = 0; t < TOKENS; t++)
          for (int h = 0; h < HEADS; h++) {
            size_t so = vec_offset(&c.spec, sb[i], kv, t, h);
            size_t d = vec_offset(&c.spec, db[i], kv, t, h);
            CHECK(memcmp(c.mem[l] + d, before[l] + so, VEC) == 0);
            memcpy(before[l] + d, before[l] + so, VEC);
          }
  for (int l = 0; l < LAYERS; l++) {
    CHECK(memcmp(c.mem[l], before[l], c.len[l]) == 0);
    free(before[l]);
  }

  KvmeshStoreStats ss;
  memset(&ss, 0, sizeof ss);
  ss.struct_size = sizeof ss;
  EXPECT(api.store_stats(worker, &ss), KVMESH_STATUS_OK);
  CHECK(ss.lookup_blocks == 5 && ss.hit_blocks == 3);
  CHECK(ss.blocks_saved == 3 && ss.blocks_loaded == 3 && ss.blocks_failed == 0);

  /* Misuse of the store entries. */
  EXPECT(api.save(c.cache, sb, keys, 3, 0, 0x1234, &op), KVMESH_STATUS_UNSUPPORTED);
  EXPECT(api.load(lk, 1, db, 3, &ld), KVMESH_STATUS_INVALID_ARGUMENT);
  EXPECT(api.lookup(c.cache, NULL, 5, 0, 1000, &lk, &found), KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.lookup_release(lk), KVMESH_STATUS_OK);
  EXPECT(api.lookup_release(lk), KVMESH_STATUS_INVALID_HANDLE);

  EXPECT(api.context_destroy(worker, 5000), KVMESH_STATUS_OK);
  EXPECT(api.context_destroy(holder, 5000), KVMESH_STATUS_OK);
  EXPECT(api.layout_destroy(c.layout), KVMESH_STATUS_OK);
  for (int l = 0; l < LAYERS; l++) free(c.mem[l]);
  free(boot);
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s libkvmesh.so\n", argv[0]);
    return 2;
  }
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    return 1;
  }
  get_api_fn get_api;
  *(void **)&get_api = dlsym(lib, "kvmesh_get_api");
  CHECK(get_api != NULL);

  /* ---- ABI negotiation, with misuse first ---- */
  CHECK(get_api(KVMESH_ABI_MAJOR + 1, sizeof api, &api) == KVMESH_STATUS_ABI_MISMATCH);
  CHECK(get_api(0, sizeof api, &api) == KVMESH_STATUS_ABI_MISMATCH);
  /* The 1.0 table ends at store_context_create: smaller is refused, the
   * 1.0 size is served. */
  const uint32_t size_1_0 = (uint32_t)offsetof(KvmeshApi, store_context_create);
  CHECK(get_api(KVMESH_ABI_MAJOR, size_1_0 - 8, &api) == KVMESH_STATUS_ABI_MISMATCH);
  memset(&api, 0, sizeof api);
  CHECK(get_api(KVMESH_ABI_MAJOR, size_1_0, &api) == KVMESH_STATUS_OK);
  CHECK(api.struct_size == size_1_0 && api.store_context_create == NULL);
  CHECK(get_api(KVMESH_ABI_MAJOR, sizeof api + 8, &api) == KVMESH_STATUS_ABI_MISMATCH);
  CHECK(get_api(KVMESH_ABI_MAJOR, sizeof api, NULL) == KVMESH_STATUS_NULL_POINTER);
  EXPECT(get_api(KVMESH_ABI_MAJOR, sizeof api, &api), KVMESH_STATUS_OK);
  CHECK(api.struct_size == sizeof api);
  CHECK(api.abi_major == KVMESH_ABI_MAJOR);
  CHECK(api.capabilities & KVMESH_CAP_PUSH);
  CHECK(api.capabilities & KVMESH_CAP_HOST_MEMORY);
  CHECK(api.abi_minor >= 1);
  CHECK((api.capabilities & (KVMESH_CAP_LOOKUP | KVMESH_CAP_SAVE | KVMESH_CAP_LOAD)) ==
        (KVMESH_CAP_LOOKUP | KVMESH_CAP_SAVE | KVMESH_CAP_LOAD));

  /* ---- two contexts: a decode side (b) and a prefill side (a) ---- */
  KvmeshContext a = 0, b = 0;
  KvmeshContextConfig cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.struct_size = sizeof cfg;
  cfg.transport = KVMESH_TRANSPORT_TCP;
  cfg.tcp_listen = "127.0.0.1:0";
  EXPECT(api.context_create(&cfg, &a), KVMESH_STATUS_OK);
  EXPECT(api.context_create(NULL, &b), KVMESH_STATUS_OK);

  struct host_cache src, dst;
  make_cache(&src, a, 8, 1);
  make_cache(&dst, b, 12, 100); /* another num_blocks: other strides */
  uint8_t fa[32], fb[32];
  EXPECT(api.layout_fingerprint(src.layout, fa), KVMESH_STATUS_OK);
  EXPECT(api.layout_fingerprint(dst.layout, fb), KVMESH_STATUS_OK);
  CHECK(memcmp(fa, fb, 32) == 0);

  /* Keep a copy of the destination to check that nothing else changes. */
  uint8_t *before[LAYERS];
  for (int l = 0; l < LAYERS; l++) {
    before[l] = malloc(dst.len[l]);
    memcpy(before[l], dst.mem[l], dst.len[l]);
  }

  /* Descriptor: b exports, a imports. */
  size_t dlen = 0;
  EXPECT(api.kv_cache_export(dst.cache, NULL, 0, &dlen), KVMESH_STATUS_BUFFER_TOO_SMALL);
  CHECK(dlen > 0);
  uint8_t *desc = malloc(dlen);
  EXPECT(api.kv_cache_export(dst.cache, desc, dlen, &dlen), KVMESH_STATUS_OK);
  KvmeshRemoteCache remote = 0;
  EXPECT(api.remote_cache_import(a, desc, dlen, &remote), KVMESH_STATUS_OK);

  /* ---- push 3 blocks ---- */
  const uint32_t sb[3] = {1, 2, 7}, db[3] = {11, 0, 5};
  const char *tid = "req-c-abi";
  KvmeshOp op = 0;
  EXPECT(api.push(src.cache, remote, sb, db, 3, (const uint8_t *)tid, strlen(tid),
                  10000, &op),
         KVMESH_STATUS_OK);
  KvmeshOpStatus st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  EXPECT(api.op_wait(op, 10000, &st), KVMESH_STATUS_OK);
  CHECK(st.state == KVMESH_OP_DONE && st.status == KVMESH_STATUS_OK);
  CHECK(st.failed_blocks == 0);
  CHECK(st.bytes == 3ull * LAYERS * 2 * TOKENS * HEADS * VEC);
  KvmeshOp done[4];
  size_t n = 0;
  EXPECT(api.poll(a, done, 4, &n), KVMESH_STATUS_OK);
  CHECK(n == 1 && done[0] == op);
  EXPECT(api.fence(a, 1000), KVMESH_STATUS_OK);

  /* The receiver learns the transfer id after the bytes landed. */
  KvmeshReceived rx[2];
  n = 0;
  for (int i = 0; i < 10000 && n == 0; i++) {
    EXPECT(api.poll_received(b, rx, 2, &n), KVMESH_STATUS_OK);
    if (n == 0) sleep_ms(1);
  }
  CHECK(n == 1);
  CHECK(rx[0].transfer_id_len == strlen(tid));
  CHECK(memcmp(rx[0].transfer_id, tid, strlen(tid)) == 0);
  CHECK(rx[0].blocks == 3);
  uint8_t id_a[16];
  EXPECT(api.context_engine_id(a, id_a), KVMESH_STATUS_OK);
  CHECK(memcmp(rx[0].from_engine, id_a, 16) == 0);

  /* Every byte: named blocks hold the source blocks, the rest is as before. */
  for (int i = 0; i < 3; i++)
    for (int l = 0; l < LAYERS; l++)
      for (int kv = 0; kv < 2; kv++)
        for (int t = 0; t < TOKENS; t++)
          for (int h = 0; h < HEADS; h++) {
            size_t so = vec_offset(&src.spec, sb[i], kv, t, h);
            size_t d = vec_offset(&dst.spec, db[i], kv, t, h);
            CHECK(memcmp(dst.mem[l] + d, src.mem[l] + so, VEC) == 0);
            memcpy(before[l] + d, src.mem[l] + so, VEC);
          }
  for (int l = 0; l < LAYERS; l++)
    CHECK(memcmp(dst.mem[l], before[l], dst.len[l]) == 0);

  KvmeshStats stats;
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  EXPECT(api.stats(a, &stats), KVMESH_STATUS_OK);
  CHECK(stats.pushes_submitted == 1 && stats.pushes_succeeded == 1);
  CHECK(stats.blocks_pushed == 3 && stats.ops_in_flight == 0 && stats.kv_caches == 1);

  store_round_trip();

  /* ---- misuse: each answers an error status ---- */
  /* Out of range: refused before any byte moves. */
  const uint32_t bad[1] = {12};
  KvmeshOp op2 = 0;
  EXPECT(api.push(src.cache, remote, sb, bad, 1, (const uint8_t *)"x", 1, 0, &op2),
         KVMESH_STATUS_OUT_OF_RANGE);
  CHECK(strstr(last_error(), "destination block 12") != NULL);
  /* Null pointers. */
  EXPECT(api.push(src.cache, remote, NULL, db, 3, (const uint8_t *)"x", 1, 0, &op2),
         KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.push(src.cache, remote, sb, db, 3, NULL, 1, 0, &op2), KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.push(src.cache, remote, sb, db, 3, (const uint8_t *)"x", 1, 0, NULL),
         KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.context_create(NULL, NULL), KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.layout_create(NULL, &op2), KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.remote_cache_import(a, NULL, 10, &remote), KVMESH_STATUS_NULL_POINTER);
  EXPECT(api.poll_received(b, rx, 2, NULL), KVMESH_STATUS_NULL_POINTER);
  /* Wrong struct sizes. */
  KvmeshLayoutSpec spec = flash_spec(4);
  KvmeshLayout lay = 0;
  spec.struct_size = 12;
  EXPECT(api.layout_create(&spec, &lay), KVMESH_STATUS_ABI_MISMATCH);
  stats.struct_size = sizeof stats + 8;
  EXPECT(api.stats(a, &stats), KVMESH_STATUS_ABI_MISMATCH);
  cfg.struct_size = 3;
  KvmeshContext c3 = 0;
  EXPECT(api.context_create(&cfg, &c3), KVMESH_STATUS_ABI_MISMATCH);
  /* Inconsistent layout: the message says what. */
  spec = flash_spec(4);
  spec.token_stride = 3;
  EXPECT(api.layout_create(&spec, &lay), KVMESH_STATUS_LAYOUT);
  CHECK(strstr(last_error(), "token stride 3 B") != NULL);
  /* Unknown and wrong-type handles. */
  EXPECT(api.op_cancel(0), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.op_cancel(0xdeadbeefcafeull), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.op_cancel((5ull << 56) | (1ull << 32) | 123456), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.kv_cache_deregister(a, 0), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.fence(src.cache, 0), KVMESH_STATUS_INVALID_HANDLE);
  /* Double free and stale handles. */
  EXPECT(api.op_release(op), KVMESH_STATUS_OK);
  EXPECT(api.op_release(op), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.op_wait(op, 0, &st), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.remote_cache_release(remote), KVMESH_STATUS_OK);
  EXPECT(api.remote_cache_release(remote), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.push(src.cache, remote, sb, db, 3, (const uint8_t *)"x", 1, 0, &op2),
         KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.kv_cache_deregister(src.cache, 5000), KVMESH_STATUS_OK);
  EXPECT(api.kv_cache_deregister(src.cache, 5000), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.layout_destroy(src.layout), KVMESH_STATUS_OK);
  EXPECT(api.layout_destroy(src.layout), KVMESH_STATUS_INVALID_HANDLE);
  const char *name = NULL;
  EXPECT(api.status_name(KVMESH_STATUS_INVALID_HANDLE, &name), KVMESH_STATUS_OK);
  CHECK(strcmp(name, "KVMESH_STATUS_INVALID_HANDLE") == 0);

  /* ---- teardown: destroying b deregisters its cache ---- */
  EXPECT(api.context_destroy(a, 5000), KVMESH_STATUS_OK);
  EXPECT(api.context_destroy(b, 5000), KVMESH_STATUS_OK);
  EXPECT(api.context_destroy(b, 5000), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.kv_cache_deregister(dst.cache, 0), KVMESH_STATUS_INVALID_HANDLE);
  EXPECT(api.layout_destroy(dst.layout), KVMESH_STATUS_OK);
  for (int l = 0; l < LAYERS; l++) {
    free(src.mem[l]);
    free(dst.mem[l]);
    free(before[l]);
  }
  free(desc);
  printf("abi_test: all %d checks ok\n", checks);
  return 0;
}
