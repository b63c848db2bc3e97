/* The kv state machine in C: the same JSON commands, answers and stored
 * bytes as the Rust kv guest (guests/kv), so the two keep the same state
 * digest. Built with clang for wasm32-wasi against wasi-libc (malloc and
 * string functions only: the component imports nothing but raft:host).
 *
 * - {"op":"put","key":K,"value":V}               -> {"previous":V_or_null}
 *   with "return_previous":false                 -> {}
 * - {"op":"delete","key":K}                      -> {"deleted":true_or_false}
 * - {"op":"cas","key":K,"expected":V_or_null,"value":V}
 *                                                -> {"ok":true} or {"ok":false,"current":V_or_null}
 * - query {"op":"get","key":K}                   -> {"value":V_or_null}
 * - query {"op":"range","start":K,"end":K_or_null,"limit":N}
 *                                                -> {"items":[{"key":K,"value":V},...]}
 *
 * State lives in the host's store (raft_host_kv_*), never in C globals: the
 * host may re-create the instance between any two calls.
 */
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "state_machine.h"

#define RANGE_LIMIT_MAX 10000

/* An answer or an error message for the host: `ok` picks which. */
typedef struct {
    bool ok;
    json_buf text;
} outcome;

static outcome refuse(const char *message) {
    outcome out = { false, { 0 } };
    json_buf_text(&out.text, message);
    return out;
}

static outcome answer(json_buf text) {
    outcome out = { true, text };
    return out;
}

/* The value under `key`, if any; false (with `error` set) if it is not
 * UTF-8. */
static bool read_text(const json_buf *key, state_machine_list_u8_t *value, bool *found, outcome *error) {
    state_machine_list_u8_t k = { key->ptr, key->len };
    *found = raft_host_kv_get(&k, value);
    if (*found && !json_utf8(value->ptr, value->len)) {
        json_buf message = { 0 };
        json_buf_text(&message, "value of ");
        json_buf_string(&message, key->ptr, key->len);
        json_buf_text(&message, " is not UTF-8");
        state_machine_list_u8_free(value);
        *error = (outcome){ false, message };
        return false;
    }
    return true;
}

static void append_optional(json_buf *out, bool found, const state_machine_list_u8_t *value) {
    if (found) {
        json_buf_string(out, value->ptr, value->len);
    } else {
        json_buf_text(out, "null");
    }
}

/* A refused write's reason, as the Rust SDK words it. */
static outcome write_refused(raft_host_kv_kv_error_t *error) {
    if (error->tag == RAFT_HOST_KV_KV_ERROR_TOO_LARGE) {
        outcome out = { false, { 0 } };
        json_buf_bytes(&out.text, error->val.too_large.ptr, error->val.too_large.len);
        raft_host_kv_kv_error_free(error);
        return out;
    }
    return refuse("kv is read-only here (writes are allowed in apply and migrate)");
}

static bool store(const json_buf *key, const json_buf *value, outcome *error) {
    state_machine_list_u8_t k = { key->ptr, key->len }, v = { value->ptr, value->len };
    raft_host_kv_kv_error_t refused;
    if (!raft_host_kv_set(&k, &v, &refused)) {
        *error = write_refused(&refused);
        return false;
    }
    return true;
}

/* Refuses the command over field `name`: `before` name `after`, as serde
 * words it. Always false, for the caller to return. */
static bool field_refused(const char *before, const char *name, const char *after, outcome *error) {
    json_buf message = { 0 };
    json_buf_text(&message, before);
    json_buf_text(&message, name);
    json_buf_text(&message, after);
    *error = (outcome){ false, message };
    return false;
}

/* The string field `name`, decoded; an absent field is an error unless
 * `optional`, and null is allowed only when `nullable`. */
static bool text_field(const json_object *object, const char *name, bool optional, bool nullable, bool *present,
                       json_buf *out, outcome *error) {
    const json_value *value = json_field_value(object, name);
    *present = value != NULL && value->kind != JSON_NULL;
    if (value == NULL && optional) return true;
    if (value == NULL) return field_refused("invalid JSON: missing field `", name, "`", error);
    if (value->kind == JSON_NULL && nullable) return true;
    if (value->kind != JSON_STRING) return field_refused("invalid JSON: field `", name, "` is not a string", error);
    *out = json_string_bytes(value);
    return true;
}

/* The boolean field `name`, or `absent` when it is not there. */
static bool bool_field(const json_object *object, const char *name, bool absent, bool *out, outcome *error) {
    const json_value *value = json_field_value(object, name);
    if (value == NULL) {
        *out = absent;
        return true;
    }
    if (value->kind != JSON_BOOL) return field_refused("invalid JSON: field `", name, "` is not a boolean", error);
    *out = value->text[0] == 't';
    return true;
}

/* Checks the op's fields; on false, `error` is set. */
static bool fields_allowed(json_object *object, const char *const *allowed, outcome *error) {
    if (json_only_fields(object, allowed)) return true;
    *error = refuse(object->error);
    return false;
}

static outcome put(json_object *command) {
    static const char *const allowed[] = { "op", "key", "value", "return_previous", NULL };
    json_buf key = { 0 }, value = { 0 };
    bool present, found, return_previous;
    state_machine_list_u8_t previous;
    outcome out;
    bool checked = fields_allowed(command, allowed, &out) &&
                   text_field(command, "key", false, false, &present, &key, &out) &&
                   text_field(command, "value", false, false, &present, &value, &out) &&
                   bool_field(command, "return_previous", true, &return_previous, &out);
    if (checked && !return_previous) {
        if (store(&key, &value, &out)) {
            json_buf text = { 0 };
            json_buf_text(&text, "{}");
            out = answer(text);
        }
    } else if (checked && read_text(&key, &previous, &found, &out)) {
        if (store(&key, &value, &out)) {
            json_buf text = { 0 };
            json_buf_text(&text, "{\"previous\":");
            append_optional(&text, found, &previous);
            json_buf_text(&text, "}");
            out = answer(text);
        }
        if (found) state_machine_list_u8_free(&previous);
    }
    json_buf_free(&key);
    json_buf_free(&value);
    return out;
}

static outcome delete_key(json_object *command) {
    static const char *const allowed[] = { "op", "key", NULL };
    json_buf key = { 0 };
    bool present;
    outcome out;
    if (fields_allowed(command, allowed, &out) && text_field(command, "key", false, false, &present, &key, &out)) {
        state_machine_list_u8_t k = { key.ptr, key.len }, existing;
        bool existed = raft_host_kv_get(&k, &existing);
        if (existed) state_machine_list_u8_free(&existing);
        raft_host_kv_kv_error_t refused;
        if (raft_host_kv_delete(&k, &refused)) {
            json_buf text = { 0 };
            json_buf_text(&text, existed ? "{\"deleted\":true}" : "{\"deleted\":false}");
            out = answer(text);
        } else {
            out = write_refused(&refused);
        }
    }
    json_buf_free(&key);
    return out;
}

static outcome cas(json_object *command) {
    static const char *const allowed[] = { "op", "key", "expected", "value", NULL };
    json_buf key = { 0 }, expected = { 0 }, value = { 0 };
    bool present, has_expected, found;
    state_machine_list_u8_t current;
    outcome out;
    if (fields_allowed(command, allowed, &out) && text_field(command, "key", false, false, &present, &key, &out) &&
        text_field(command, "expected", true, true, &has_expected, &expected, &out) &&
        text_field(command, "value", false, false, &present, &value, &out) &&
        read_text(&key, &current, &found, &out)) {
        bool equal = found == has_expected &&
                     (!found || (current.len == expected.len &&
                                 (current.len == 0 || memcmp(current.ptr, expected.ptr, current.len) == 0)));
        if (equal) {
            if (store(&key, &value, &out)) {
                json_buf text = { 0 };
                json_buf_text(&text, "{\"ok\":true}");
                out = answer(text);
            }
        } else {
            json_buf text = { 0 };
            json_buf_text(&text, "{\"ok\":false,\"current\":");
            append_optional(&text, found, &current);
            json_buf_text(&text, "}");
            out = answer(text);
        }
        if (found) state_machine_list_u8_free(&current);
    }
    json_buf_free(&key);
    json_buf_free(&expected);
    json_buf_free(&value);
    return out;
}

static outcome get(json_object *query) {
    static const char *const allowed[] = { "op", "key", NULL };
    json_buf key = { 0 };
    bool present, found;
    state_machine_list_u8_t value;
    outcome out;
    if (fields_allowed(query, allowed, &out) && text_field(query, "key", false, false, &present, &key, &out) &&
        read_text(&key, &value, &found, &out)) {
        json_buf text = { 0 };
        json_buf_text(&text, "{\"value\":");
        append_optional(&text, found, &value);
        json_buf_text(&text, "}");
        out = answer(text);
        if (found) state_machine_list_u8_free(&value);
    }
    json_buf_free(&key);
    return out;
}

static outcome range(json_object *query) {
    static const char *const allowed[] = { "op", "start", "end", "limit", NULL };
    json_buf start = { 0 }, end = { 0 };
    bool present, has_end;
    uint32_t limit;
    outcome out;
    if (fields_allowed(query, allowed, &out) && text_field(query, "start", false, false, &present, &start, &out) &&
        text_field(query, "end", true, true, &has_end, &end, &out)) {
        const json_value *limit_value = json_field_value(query, "limit");
        if (limit_value == NULL) {
            out = refuse("invalid JSON: missing field `limit`");
        } else if (!json_u32(limit_value, &limit)) {
            out = refuse("invalid JSON: field `limit` is not an integer from 0 to 4294967295");
        } else {
            state_machine_list_u8_t s = { start.ptr, start.len }, e = { end.ptr, end.len };
            raft_host_kv_list_pair_t pairs;
            raft_host_kv_scan(&s, has_end ? &e : NULL, limit < RANGE_LIMIT_MAX ? limit : RANGE_LIMIT_MAX, &pairs);
            json_buf text = { 0 };
            json_buf_text(&text, "{\"items\":[");
            out.ok = true;
            for (size_t i = 0; i < pairs.len && out.ok; i++) {
                raft_host_kv_pair_t *pair = &pairs.ptr[i];
                if (!json_utf8(pair->key.ptr, pair->key.len)) {
                    json_buf_free(&text);
                    out = refuse("a key is not UTF-8");
                } else if (!json_utf8(pair->value.ptr, pair->value.len)) {
                    json_buf_free(&text);
                    out = refuse("value of ");
                    json_buf_string(&out.text, pair->key.ptr, pair->key.len);
                    json_buf_text(&out.text, " is not UTF-8");
                } else {
                    json_buf_text(&text, i == 0 ? "{\"key\":" : ",{\"key\":");
                    json_buf_string(&text, pair->key.ptr, pair->key.len);
                    json_buf_text(&text, ",\"value\":");
                    json_buf_string(&text, pair->value.ptr, pair->value.len);
                    json_buf_text(&text, "}");
                }
            }
            if (out.ok) {
                json_buf_text(&text, "]}");
                out = answer(text);
            }
            raft_host_kv_list_pair_free(&pairs);
        }
    }
    json_buf_free(&start);
    json_buf_free(&end);
    return out;
}

typedef outcome (*handler)(json_object *);

typedef struct {
    const char *op;
    handler run;
} operation;

static const operation COMMANDS[] = { { "put", put }, { "delete", delete_key }, { "cas", cas }, { NULL, NULL } };
static const operation QUERIES[] = { { "get", get }, { "range", range }, { NULL, NULL } };

static outcome dispatch(const operation *operations, state_machine_list_u8_t *input) {
    json_object object;
    outcome out;
    if (!json_parse_object(input->ptr, input->len, &object)) {
        return refuse(object.error);
    }
    const json_value *op = json_field_value(&object, "op");
    if (op == NULL) {
        out = refuse("invalid JSON: missing field `op`");
    } else if (op->kind != JSON_STRING) {
        out = refuse("invalid JSON: field `op` is not a string");
    } else {
        out = refuse("invalid JSON: unknown variant `");
        json_buf name = json_string_bytes(op);
        json_buf_bytes(&out.text, name.ptr, name.len);
        json_buf_text(&out.text, "`");
        json_buf_free(&name);
        for (const operation *operation = operations; operation->op != NULL; operation++) {
            if (json_string_equals(op, operation->op)) {
                json_buf_free(&out.text);
                out = operation->run(&object);
                break;
            }
        }
    }
    json_object_free(&object);
    return out;
}

/* Hands an outcome to the host, which frees it after the call. */
static bool reply(outcome out, state_machine_list_u8_t *ret, state_machine_string_t *err) {
    if (out.ok) {
        ret->ptr = out.text.ptr;
        ret->len = out.text.len;
    } else {
        err->ptr = out.text.ptr;
        err->len = out.text.len;
    }
    return out.ok;
}

bool exports_state_machine_apply(state_machine_list_u8_t *command, state_machine_list_u8_t *ret,
                                 state_machine_string_t *err) {
    outcome out = dispatch(COMMANDS, command);
    state_machine_list_u8_free(command);
    return reply(out, ret, err);
}

bool exports_state_machine_query(state_machine_list_u8_t *request, state_machine_list_u8_t *ret,
                                 state_machine_string_t *err) {
    outcome out = dispatch(QUERIES, request);
    state_machine_list_u8_free(request);
    return reply(out, ret, err);
}

bool exports_state_machine_migrate(state_machine_string_t *previous, state_machine_string_t *err) {
    (void)err;
    state_machine_string_free(previous);
    return true;
}
