/* {{name}}: a raft-host state machine in C. Commands and queries are JSON:
 *
 * - {"op":"add","key":K,"by":N} adds N to counter K and answers its new value
 * - query {"op":"get","key":K} answers it
 *
 * Every replica applies the same commands in the same order. Keep all state
 * in kv (raft_host_kv_*), never in C globals: the host may re-create the
 * instance between any two calls. Returning false refuses a command and
 * discards its writes. json.h reads commands strictly and writes answers.
 */
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "state_machine.h"

/* Hands `text` to the host as the answer (true) or the error (false). */
static bool reply(bool ok, json_buf text, state_machine_list_u8_t *ret, state_machine_string_t *err) {
    if (ok) {
        ret->ptr = text.ptr;
        ret->len = text.len;
    } else {
        err->ptr = text.ptr;
        err->len = text.len;
    }
    return ok;
}

static bool refuse(const char *message, state_machine_string_t *err) {
    json_buf text = { 0 };
    json_buf_text(&text, message);
    return reply(false, text, NULL, err);
}

/* The counter under `key` (0 when absent); false if what is stored is not
 * a number this guest wrote. */
static bool counter(const json_buf *key, int64_t *value) {
    state_machine_list_u8_t k = { key->ptr, key->len }, stored;
    *value = 0;
    if (!raft_host_kv_get(&k, &stored)) return true;
    json_value number = { JSON_NUMBER, stored.ptr, stored.len };
    bool ok = json_i64(&number, value);
    state_machine_list_u8_free(&stored);
    return ok;
}

/* The command's "key" (a string) after checking it has only `allowed`
 * fields; false with `object->error` set otherwise. */
static bool key_of(json_object *object, const char *const *allowed, json_buf *key) {
    const json_value *value = json_field_value(object, "key");
    if (!json_only_fields(object, allowed)) return false;
    if (value == NULL || value->kind != JSON_STRING) {
        strcpy(object->error, "expected a string \"key\"");
        return false;
    }
    *key = json_string_bytes(value);
    return true;
}

bool exports_state_machine_apply(state_machine_list_u8_t *command, state_machine_list_u8_t *ret,
                                 state_machine_string_t *err) {
    static const char *const allowed[] = { "op", "key", "by", NULL };
    json_object object;
    /* The parsed values point into command: it is freed last. */
    if (!json_parse_object(command->ptr, command->len, &object)) {
        state_machine_list_u8_free(command);
        return refuse(object.error, err);
    }
    json_buf key = { 0 };
    int64_t by, value;
    bool ok = false;
    if (!json_string_equals(json_field_value(&object, "op"), "add") ||
        !json_i64(json_field_value(&object, "by"), &by)) {
        ok = refuse("expected {\"op\":\"add\",\"key\":K,\"by\":N}", err);
    } else if (!key_of(&object, allowed, &key)) {
        ok = refuse(object.error, err);
    } else if (!counter(&key, &value)) {
        ok = refuse("the stored counter is not a number", err);
    } else if (__builtin_add_overflow(value, by, &value)) {
        ok = refuse("the counter would overflow", err);
    } else {
        json_buf text = { 0 };
        json_buf_i64(&text, value);
        state_machine_list_u8_t k = { key.ptr, key.len }, v = { text.ptr, text.len };
        raft_host_kv_kv_error_t refused;
        if (raft_host_kv_set(&k, &v, &refused)) {
            ok = reply(true, text, ret, err);
        } else {
            raft_host_kv_kv_error_free(&refused);
            json_buf_free(&text);
            ok = refuse("the host refused the write", err);
        }
    }
    json_buf_free(&key);
    json_object_free(&object);
    state_machine_list_u8_free(command);
    return ok;
}

bool exports_state_machine_query(state_machine_list_u8_t *request, state_machine_list_u8_t *ret,
                                 state_machine_string_t *err) {
    static const char *const allowed[] = { "op", "key", NULL };
    json_object object;
    /* The parsed values point into request: it is freed last. */
    if (!json_parse_object(request->ptr, request->len, &object)) {
        state_machine_list_u8_free(request);
        return refuse(object.error, err);
    }
    json_buf key = { 0 };
    int64_t value;
    bool ok;
    if (!json_string_equals(json_field_value(&object, "op"), "get")) {
        ok = refuse("expected {\"op\":\"get\",\"key\":K}", err);
    } else if (!key_of(&object, allowed, &key)) {
        ok = refuse(object.error, err);
    } else if (!counter(&key, &value)) {
        ok = refuse("the stored counter is not a number", err);
    } else {
        json_buf text = { 0 };
        json_buf_i64(&text, value);
        ok = reply(true, text, ret, err);
    }
    json_buf_free(&key);
    json_object_free(&object);
    state_machine_list_u8_free(request);
    return ok;
}

bool exports_state_machine_migrate(state_machine_string_t *previous, state_machine_string_t *err) {
    (void)err;
    state_machine_string_free(previous);
    return true;
}
