/* See test_host.h. The store is a sorted array, small and slow on purpose:
 * it is for tests. */
#include "test_host.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "state_machine.h"

typedef struct {
    state_machine_list_u8_t key;
    state_machine_list_u8_t value;
    bool deleted; /* in a transaction: a delete not yet committed */
} entry;

typedef struct {
    entry *entries;
    size_t len;
} table;

static table committed, pending;
static bool writable;
static uint64_t index_now, random_state;

static state_machine_list_u8_t copy_bytes(const uint8_t *bytes, size_t len) {
    state_machine_list_u8_t out = { malloc(len ? len : 1), len };
    if (len) memcpy(out.ptr, bytes, len);
    return out;
}

static int compare(const state_machine_list_u8_t *a, const state_machine_list_u8_t *b) {
    size_t n = a->len < b->len ? a->len : b->len;
    int order = n ? memcmp(a->ptr, b->ptr, n) : 0;
    return order ? order : (a->len > b->len) - (a->len < b->len);
}

/* Where `key` is in `t`, or where it would go (`*found` false). */
static size_t position(const table *t, const state_machine_list_u8_t *key, bool *found) {
    size_t low = 0, high = t->len;
    while (low < high) {
        size_t middle = (low + high) / 2;
        int order = compare(&t->entries[middle].key, key);
        if (order == 0) {
            *found = true;
            return middle;
        }
        if (order < 0) low = middle + 1; else high = middle;
    }
    *found = false;
    return low;
}

static void put(table *t, const state_machine_list_u8_t *key, const state_machine_list_u8_t *value, bool deleted) {
    bool found;
    size_t at = position(t, key, &found);
    if (found) {
        free(t->entries[at].value.ptr);
    } else {
        t->entries = realloc(t->entries, (t->len + 1) * sizeof *t->entries);
        memmove(&t->entries[at + 1], &t->entries[at], (t->len - at) * sizeof *t->entries);
        t->len++;
        t->entries[at].key = copy_bytes(key->ptr, key->len);
    }
    t->entries[at].value = copy_bytes(value ? value->ptr : NULL, value ? value->len : 0);
    t->entries[at].deleted = deleted;
}

static void clear(table *t) {
    for (size_t i = 0; i < t->len; i++) {
        free(t->entries[i].key.ptr);
        free(t->entries[i].value.ptr);
    }
    free(t->entries);
    t->entries = NULL;
    t->len = 0;
}

/* The value of `key` as this call sees it: its own writes first. */
static const entry *lookup(const state_machine_list_u8_t *key) {
    bool found;
    size_t at = position(&pending, key, &found);
    if (found) return pending.entries[at].deleted ? NULL : &pending.entries[at];
    at = position(&committed, key, &found);
    return found ? &committed.entries[at] : NULL;
}

bool raft_host_kv_get(state_machine_list_u8_t *key, state_machine_list_u8_t *ret) {
    const entry *e = lookup(key);
    if (e == NULL) return false;
    *ret = copy_bytes(e->value.ptr, e->value.len);
    return true;
}

static bool stage_write(state_machine_list_u8_t *key, state_machine_list_u8_t *value, raft_host_kv_kv_error_t *err) {
    if (!writable) {
        err->tag = RAFT_HOST_KV_KV_ERROR_READ_ONLY;
        return false;
    }
    put(&pending, key, value, value == NULL);
    return true;
}

bool raft_host_kv_set(state_machine_list_u8_t *key, state_machine_list_u8_t *value, raft_host_kv_kv_error_t *err) {
    return stage_write(key, value, err);
}

bool raft_host_kv_delete(state_machine_list_u8_t *key, raft_host_kv_kv_error_t *err) {
    return stage_write(key, NULL, err);
}

void raft_host_kv_scan(state_machine_list_u8_t *start, state_machine_list_u8_t *maybe_end, uint32_t limit,
                       raft_host_kv_list_pair_t *ret) {
    /* The union of both tables, in key order, without what this call deleted. */
    ret->ptr = malloc(sizeof *ret->ptr * (committed.len + pending.len + 1));
    ret->len = 0;
    bool found;
    size_t c = position(&committed, start, &found), p = position(&pending, start, &found);
    while (ret->len < limit && (c < committed.len || p < pending.len)) {
        const entry *next;
        if (p >= pending.len || (c < committed.len && compare(&committed.entries[c].key, &pending.entries[p].key) < 0)) {
            next = &committed.entries[c++];
        } else {
            if (c < committed.len && compare(&committed.entries[c].key, &pending.entries[p].key) == 0) c++;
            next = &pending.entries[p++];
        }
        if (maybe_end != NULL && compare(&next->key, maybe_end) >= 0) break;
        if (next->deleted) continue;
        ret->ptr[ret->len].key = copy_bytes(next->key.ptr, next->key.len);
        ret->ptr[ret->len].value = copy_bytes(next->value.ptr, next->value.len);
        ret->len++;
    }
}

void raft_host_context_entry(raft_host_context_entry_info_t *ret) {
    ret->index = index_now;
    ret->term = 1;
    ret->timestamp_ms = 1700000000000ULL + index_now;
}

uint64_t raft_host_context_random_u64(void) {
    /* splitmix64, seeded by the entry: the same on every run. */
    uint64_t z = (random_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void raft_host_context_log(raft_host_context_level_t level, state_machine_string_t *message) {
    fprintf(stderr, "[guest log %d] %.*s\n", level, (int)message->len, (const char *)message->ptr);
}

/* The bindings' helpers the state machine may call, as state_machine.c
 * defines them for the component. */
void state_machine_list_u8_free(state_machine_list_u8_t *ptr) {
    free(ptr->ptr);
    ptr->ptr = NULL;
    ptr->len = 0;
}

void state_machine_string_free(state_machine_string_t *ret) {
    free(ret->ptr);
    ret->ptr = NULL;
    ret->len = 0;
}

void state_machine_string_dup(state_machine_string_t *ret, const char *s) {
    state_machine_list_u8_t bytes = copy_bytes((const uint8_t *)s, strlen(s));
    ret->ptr = bytes.ptr;
    ret->len = bytes.len;
}

void raft_host_kv_kv_error_free(raft_host_kv_kv_error_t *ptr) {
    if (ptr->tag == RAFT_HOST_KV_KV_ERROR_TOO_LARGE) state_machine_string_free(&ptr->val.too_large);
}

void raft_host_kv_list_pair_free(raft_host_kv_list_pair_t *ptr) {
    for (size_t i = 0; i < ptr->len; i++) {
        free(ptr->ptr[i].key.ptr);
        free(ptr->ptr[i].value.ptr);
    }
    free(ptr->ptr);
    ptr->ptr = NULL;
    ptr->len = 0;
}

static char *text_of(const uint8_t *bytes, size_t len) {
    char *text = malloc(len + 1);
    if (len) memcpy(text, bytes, len);
    text[len] = '\0';
    return text;
}

static bool call(bool apply, const char *input, char **answer) {
    state_machine_list_u8_t in = copy_bytes((const uint8_t *)input, strlen(input)), ret = { 0 };
    state_machine_string_t err = { 0 };
    writable = apply;
    if (apply) {
        index_now++;
        random_state = index_now;
    }
    bool ok = apply ? exports_state_machine_apply(&in, &ret, &err) : exports_state_machine_query(&in, &ret, &err);
    writable = false;
    *answer = ok ? text_of(ret.ptr, ret.len) : text_of(err.ptr, err.len);
    free(ok ? ret.ptr : err.ptr);
    for (size_t i = 0; ok && i < pending.len; i++) {
        if (pending.entries[i].deleted) {
            bool found;
            size_t at = position(&committed, &pending.entries[i].key, &found);
            if (found) {
                free(committed.entries[at].key.ptr);
                free(committed.entries[at].value.ptr);
                memmove(&committed.entries[at], &committed.entries[at + 1],
                        (committed.len - at - 1) * sizeof *committed.entries);
                committed.len--;
            }
        } else {
            put(&committed, &pending.entries[i].key, &pending.entries[i].value, false);
        }
    }
    clear(&pending);
    return ok;
}

bool test_apply(const char *command, char **answer) { return call(true, command, answer); }

bool test_query(const char *request, char **answer) { return call(false, request, answer); }

char *test_get(const char *key) {
    state_machine_list_u8_t k = { (uint8_t *)key, strlen(key) };
    bool found;
    size_t at = position(&committed, &k, &found);
    return found ? text_of(committed.entries[at].value.ptr, committed.entries[at].value.len) : NULL;
}

void test_reset(void) {
    clear(&committed);
    clear(&pending);
    index_now = 0;
}
