/* A strict reader of one JSON object and a writer of compact JSON, for
 * raft-host state machines written in C. Commands and queries are JSON
 * objects; answers are compact JSON, escaped the way serde_json escapes them,
 * so a C guest answers byte for byte like the Rust guests.
 *
 * The reader checks the whole text (grammar, escapes, UTF-8, duplicate
 * fields, nesting depth) before anything is used, keeps each field's value as
 * a span of the input, and decodes a value only when asked. It needs only
 * malloc and free: no WASI, no stdio.
 */
#ifndef RAFT_GUEST_JSON_H
#define RAFT_GUEST_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    JSON_NULL,
    JSON_BOOL,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT,
} json_kind;

/* A checked value: its kind and its text in the input (a string with its
 * quotes). */
typedef struct {
    json_kind kind;
    const uint8_t *text;
    size_t len;
} json_value;

/* A field of the object; `name` is its decoded name, NUL-terminated. */
typedef struct {
    char *name;
    json_value value;
} json_field;

/* A parsed object, or the reason it is not one (`error`). */
typedef struct {
    json_field *fields;
    size_t count;
    char error[160];
} json_object;

/* A growing byte buffer; `ptr` is malloc'd (hand it to the host as an answer,
 * or free it with json_buf_free). */
typedef struct {
    uint8_t *ptr;
    size_t len;
    size_t cap;
} json_buf;

/* Parses `text` as one JSON object. On false, `out->error` says why and there
 * is nothing to free. */
bool json_parse_object(const uint8_t *text, size_t len, json_object *out);
void json_object_free(json_object *object);

/* The field named `name`, or NULL. */
const json_value *json_field_value(const json_object *object, const char *name);

/* True when every field's name is in `allowed` (NULL-terminated); otherwise
 * false, with the first other field's name in `object->error`. */
bool json_only_fields(json_object *object, const char *const *allowed);

/* The decoded bytes of a string value (UTF-8, not NUL-terminated). */
json_buf json_string_bytes(const json_value *value);
/* True when `value` is a string equal to `expected`. */
bool json_string_equals(const json_value *value, const char *expected);
/* An integer value in [0, 2^32), as serde reads a u32. */
bool json_u32(const json_value *value, uint32_t *out);
/* An integer value in [-2^63, 2^63), as serde reads an i64. */
bool json_i64(const json_value *value, int64_t *out);

void json_buf_bytes(json_buf *buf, const void *bytes, size_t len);
void json_buf_text(json_buf *buf, const char *text);
/* Appends `bytes` (UTF-8) as a quoted JSON string. */
void json_buf_string(json_buf *buf, const uint8_t *bytes, size_t len);
void json_buf_i64(json_buf *buf, int64_t value);
void json_buf_free(json_buf *buf);

/* True when `bytes` are valid UTF-8. */
bool json_utf8(const uint8_t *bytes, size_t len);

#ifdef __cplusplus
}
#endif

#endif
