/* See json.h. The grammar is RFC 8259's; what serde_json refuses is refused
 * here too (lone surrogates, control characters in strings, bad UTF-8, more
 * than 128 levels of nesting, text after the value). */
#include "json.h"

#include <stdlib.h>
#include <string.h>

#define JSON_DEPTH_MAX 128

/* Running out of memory ends the call as a trap does: the host discards the
 * call's writes and reports it, on every replica alike. */
static void *must(void *pointer) {
    if (pointer == NULL) {
        __builtin_trap();
    }
    return pointer;
}

typedef struct {
    const uint8_t *at;
    const uint8_t *end;
    char *error;
} reader;

static bool fail(reader *r, const char *why) {
    if (r->error[0] == '\0') {
        size_t n = strlen(why);
        if (n > 150) {
            n = 150;
        }
        memcpy(r->error, "invalid JSON: ", 14);
        memcpy(r->error + 14, why, n);
        r->error[14 + n] = '\0';
    }
    return false;
}

static void skip_space(reader *r) {
    while (r->at < r->end && (*r->at == ' ' || *r->at == '\t' || *r->at == '\n' || *r->at == '\r')) {
        r->at++;
    }
}

static int hex_digit(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool read_hex4(const uint8_t *at, const uint8_t *end, uint32_t *out) {
    if (end - at < 4) return false;
    uint32_t value = 0;
    for (int i = 0; i < 4; i++) {
        int digit = hex_digit(at[i]);
        if (digit < 0) return false;
        value = value << 4 | (uint32_t)digit;
    }
    *out = value;
    return true;
}

/* The length of the UTF-8 sequence at `at`, or 0 if it is not one. */
static size_t utf8_sequence(const uint8_t *at, const uint8_t *end) {
    uint8_t c = at[0];
    size_t need;
    uint32_t min, code;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) { need = 2; min = 0x80; code = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { need = 3; min = 0x800; code = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { need = 4; min = 0x10000; code = c & 0x07; }
    else return 0;
    if ((size_t)(end - at) < need) return 0;
    for (size_t i = 1; i < need; i++) {
        if ((at[i] & 0xC0) != 0x80) return 0;
        code = code << 6 | (at[i] & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return 0;
    return need;
}

bool json_utf8(const uint8_t *bytes, size_t len) {
    const uint8_t *at = bytes, *end = bytes + len;
    while (at < end) {
        size_t n = utf8_sequence(at, end);
        if (n == 0) return false;
        at += n;
    }
    return true;
}

/* Checks a string starting at its opening quote; leaves `r->at` after it. */
static bool check_string(reader *r) {
    r->at++;
    while (r->at < r->end) {
        uint8_t c = *r->at;
        if (c == '"') {
            r->at++;
            return true;
        }
        if (c < 0x20) return fail(r, "control character in a string");
        if (c == '\\') {
            if (r->end - r->at < 2) break;
            uint8_t e = r->at[1];
            if (e == 'u') {
                uint32_t unit;
                if (!read_hex4(r->at + 2, r->end, &unit)) return fail(r, "invalid \\u escape");
                r->at += 6;
                if (unit >= 0xDC00 && unit <= 0xDFFF) return fail(r, "lone trailing surrogate in a \\u escape");
                if (unit >= 0xD800 && unit <= 0xDBFF) {
                    uint32_t low;
                    if (r->end - r->at < 6 || r->at[0] != '\\' || r->at[1] != 'u' ||
                        !read_hex4(r->at + 2, r->end, &low) || low < 0xDC00 || low > 0xDFFF) {
                        return fail(r, "lone leading surrogate in a \\u escape");
                    }
                    r->at += 6;
                }
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0') return fail(r, "invalid escape");
            r->at += 2;
            continue;
        }
        size_t n = utf8_sequence(r->at, r->end);
        if (n == 0) return fail(r, "invalid UTF-8 in a string");
        r->at += n;
    }
    return fail(r, "unterminated string");
}

static bool check_digits(reader *r) {
    if (r->at >= r->end || *r->at < '0' || *r->at > '9') return fail(r, "invalid number");
    while (r->at < r->end && *r->at >= '0' && *r->at <= '9') r->at++;
    return true;
}

static bool check_number(reader *r) {
    if (*r->at == '-') r->at++;
    if (r->at < r->end && *r->at == '0') {
        r->at++;
    } else if (!check_digits(r)) {
        return false;
    }
    if (r->at < r->end && *r->at == '.') {
        r->at++;
        if (!check_digits(r)) return false;
    }
    if (r->at < r->end && (*r->at == 'e' || *r->at == 'E')) {
        r->at++;
        if (r->at < r->end && (*r->at == '+' || *r->at == '-')) r->at++;
        if (!check_digits(r)) return false;
    }
    return true;
}

static bool check_literal(reader *r, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->at) < n || memcmp(r->at, word, n) != 0) return fail(r, "expected a value");
    r->at += n;
    return true;
}

static bool check_value(reader *r, int depth, json_value *out);

/* An array or an object nested in the top-level one: checked, not kept. */
static bool check_nested(reader *r, int depth, uint8_t close) {
    if (depth > JSON_DEPTH_MAX) return fail(r, "recursion limit exceeded");
    r->at++;
    skip_space(r);
    if (r->at < r->end && *r->at == close) {
        r->at++;
        return true;
    }
    for (;;) {
        json_value ignored;
        if (close == '}') {
            skip_space(r);
            if (r->at >= r->end || *r->at != '"') return fail(r, "expected a field name");
            if (!check_string(r)) return false;
            skip_space(r);
            if (r->at >= r->end || *r->at != ':') return fail(r, "expected `:`");
            r->at++;
        }
        if (!check_value(r, depth, &ignored)) return false;
        skip_space(r);
        if (r->at < r->end && *r->at == ',') {
            r->at++;
            continue;
        }
        if (r->at < r->end && *r->at == close) {
            r->at++;
            return true;
        }
        return fail(r, close == '}' ? "expected `,` or `}`" : "expected `,` or `]`");
    }
}

static bool check_value(reader *r, int depth, json_value *out) {
    skip_space(r);
    if (r->at >= r->end) return fail(r, "EOF while parsing a value");
    const uint8_t *start = r->at;
    bool ok;
    switch (*r->at) {
    case '"': out->kind = JSON_STRING; ok = check_string(r); break;
    case '{': out->kind = JSON_OBJECT; ok = check_nested(r, depth + 1, '}'); break;
    case '[': out->kind = JSON_ARRAY; ok = check_nested(r, depth + 1, ']'); break;
    case 'n': out->kind = JSON_NULL; ok = check_literal(r, "null"); break;
    case 't': out->kind = JSON_BOOL; ok = check_literal(r, "true"); break;
    case 'f': out->kind = JSON_BOOL; ok = check_literal(r, "false"); break;
    default:
        if (*r->at == '-' || (*r->at >= '0' && *r->at <= '9')) {
            out->kind = JSON_NUMBER;
            ok = check_number(r);
        } else {
            ok = fail(r, "expected a value");
        }
    }
    out->text = start;
    out->len = (size_t)(r->at - start);
    return ok;
}

/* Decodes a checked string (with its quotes) into `buf`. */
static void decode_string(const uint8_t *text, size_t len, json_buf *buf) {
    const uint8_t *at = text + 1, *end = text + len - 1;
    while (at < end) {
        if (*at != '\\') {
            const uint8_t *run = at;
            while (at < end && *at != '\\') at++;
            json_buf_bytes(buf, run, (size_t)(at - run));
            continue;
        }
        uint8_t e = at[1];
        uint8_t one;
        switch (e) {
        case 'b': one = '\b'; break;
        case 'f': one = '\f'; break;
        case 'n': one = '\n'; break;
        case 'r': one = '\r'; break;
        case 't': one = '\t'; break;
        case 'u': {
            uint32_t code, low;
            read_hex4(at + 2, end, &code);
            at += 6;
            if (code >= 0xD800 && code <= 0xDBFF) {
                read_hex4(at + 2, end, &low);
                at += 6;
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
            }
            uint8_t utf8[4];
            size_t n;
            if (code < 0x80) { utf8[0] = (uint8_t)code; n = 1; }
            else if (code < 0x800) { utf8[0] = 0xC0 | (uint8_t)(code >> 6); utf8[1] = 0x80 | (code & 0x3F); n = 2; }
            else if (code < 0x10000) {
                utf8[0] = 0xE0 | (uint8_t)(code >> 12); utf8[1] = 0x80 | ((code >> 6) & 0x3F);
                utf8[2] = 0x80 | (code & 0x3F); n = 3;
            } else {
                utf8[0] = 0xF0 | (uint8_t)(code >> 18); utf8[1] = 0x80 | ((code >> 12) & 0x3F);
                utf8[2] = 0x80 | ((code >> 6) & 0x3F); utf8[3] = 0x80 | (code & 0x3F); n = 4;
            }
            json_buf_bytes(buf, utf8, n);
            continue;
        }
        default: one = e; /* " \ / */
        }
        json_buf_bytes(buf, &one, 1);
        at += 2;
    }
}

bool json_parse_object(const uint8_t *text, size_t len, json_object *out) {
    memset(out, 0, sizeof *out);
    reader r = { text, text + len, out->error };
    size_t cap = 0;
    skip_space(&r);
    if (r.at >= r.end || *r.at != '{') {
        return fail(&r, "expected an object");
    }
    r.at++;
    skip_space(&r);
    bool ok = true;
    if (r.at < r.end && *r.at == '}') {
        r.at++;
    } else {
        for (;;) {
            skip_space(&r);
            const uint8_t *name = r.at;
            if (r.at >= r.end || *r.at != '"') { ok = fail(&r, "expected a field name"); break; }
            if (!check_string(&r)) { ok = false; break; }
            json_buf decoded = { 0 };
            decode_string(name, (size_t)(r.at - name), &decoded);
            json_buf_bytes(&decoded, "", 1);
            if (out->count == cap) {
                cap = cap ? cap * 2 : 8;
                out->fields = must(realloc(out->fields, cap * sizeof *out->fields));
            }
            json_field *field = &out->fields[out->count++];
            field->name = (char *)decoded.ptr;
            if (strlen(field->name) != decoded.len - 1) {
                ok = fail(&r, "a field name holds a NUL character");
                break;
            }
            for (size_t i = 0; i + 1 < out->count; i++) {
                if (strcmp(out->fields[i].name, field->name) == 0) {
                    fail(&r, "duplicate field `");
                    size_t used = strlen(out->error), room = sizeof out->error - used - 2;
                    strncat(out->error, field->name, room);
                    strcat(out->error, "`");
                    ok = false;
                    break;
                }
            }
            if (!ok) break;
            skip_space(&r);
            if (r.at >= r.end || *r.at != ':') { ok = fail(&r, "expected `:`"); break; }
            r.at++;
            if (!check_value(&r, 1, &field->value)) { ok = false; break; }
            skip_space(&r);
            if (r.at < r.end && *r.at == ',') { r.at++; continue; }
            if (r.at < r.end && *r.at == '}') { r.at++; break; }
            ok = fail(&r, "expected `,` or `}`");
            break;
        }
    }
    if (ok) {
        skip_space(&r);
        if (r.at != r.end) ok = fail(&r, "trailing characters");
    }
    if (!ok) {
        char error[sizeof out->error];
        memcpy(error, out->error, sizeof error);
        json_object_free(out);
        memcpy(out->error, error, sizeof error);
    }
    return ok;
}

void json_object_free(json_object *object) {
    for (size_t i = 0; i < object->count; i++) {
        free(object->fields[i].name);
    }
    free(object->fields);
    memset(object, 0, sizeof *object);
}

const json_value *json_field_value(const json_object *object, const char *name) {
    for (size_t i = 0; i < object->count; i++) {
        if (strcmp(object->fields[i].name, name) == 0) return &object->fields[i].value;
    }
    return NULL;
}

bool json_only_fields(json_object *object, const char *const *allowed) {
    for (size_t i = 0; i < object->count; i++) {
        bool known = false;
        for (const char *const *name = allowed; *name != NULL; name++) {
            known = known || strcmp(*name, object->fields[i].name) == 0;
        }
        if (!known) {
            strcpy(object->error, "invalid JSON: unknown field `");
            strncat(object->error, object->fields[i].name, sizeof object->error - strlen(object->error) - 2);
            strcat(object->error, "`");
            return false;
        }
    }
    return true;
}

json_buf json_string_bytes(const json_value *value) {
    json_buf buf = { 0 };
    if (value->kind == JSON_STRING) decode_string(value->text, value->len, &buf);
    return buf;
}

bool json_string_equals(const json_value *value, const char *expected) {
    if (value == NULL || value->kind != JSON_STRING) return false;
    json_buf decoded = json_string_bytes(value);
    bool equal = decoded.len == strlen(expected) && (decoded.len == 0 || memcmp(decoded.ptr, expected, decoded.len) == 0);
    json_buf_free(&decoded);
    return equal;
}

/* An integer literal (no fraction, no exponent) as a sign and magnitude. */
static bool integer(const json_value *value, bool *negative, uint64_t *magnitude) {
    if (value == NULL || value->kind != JSON_NUMBER) return false;
    const uint8_t *at = value->text, *end = value->text + value->len;
    *negative = *at == '-';
    if (*negative) at++;
    uint64_t n = 0;
    for (; at < end; at++) {
        if (*at < '0' || *at > '9') return false;
        uint64_t digit = (uint64_t)(*at - '0');
        if (n > (UINT64_MAX - digit) / 10) return false;
        n = n * 10 + digit;
    }
    *magnitude = n;
    return true;
}

bool json_u32(const json_value *value, uint32_t *out) {
    bool negative;
    uint64_t n;
    if (!integer(value, &negative, &n) || (negative && n != 0) || n > UINT32_MAX) return false;
    *out = (uint32_t)n;
    return true;
}

bool json_i64(const json_value *value, int64_t *out) {
    bool negative;
    uint64_t n;
    if (!integer(value, &negative, &n)) return false;
    if (negative) {
        if (n > (uint64_t)INT64_MAX + 1) return false;
        *out = n == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)n;
    } else {
        if (n > (uint64_t)INT64_MAX) return false;
        *out = (int64_t)n;
    }
    return true;
}

void json_buf_bytes(json_buf *buf, const void *bytes, size_t len) {
    if (buf->len + len > buf->cap) {
        size_t cap = buf->cap ? buf->cap : 64;
        while (cap < buf->len + len) cap *= 2;
        buf->ptr = must(realloc(buf->ptr, cap));
        buf->cap = cap;
    }
    if (len > 0) memcpy(buf->ptr + buf->len, bytes, len);
    buf->len += len;
}

void json_buf_text(json_buf *buf, const char *text) {
    json_buf_bytes(buf, text, strlen(text));
}

void json_buf_string(json_buf *buf, const uint8_t *bytes, size_t len) {
    static const char hex[] = "0123456789abcdef";
    json_buf_bytes(buf, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = bytes[i];
        const char *escape = NULL;
        char unicode[7];
        switch (c) {
        case '"': escape = "\\\""; break;
        case '\\': escape = "\\\\"; break;
        case '\b': escape = "\\b"; break;
        case '\f': escape = "\\f"; break;
        case '\n': escape = "\\n"; break;
        case '\r': escape = "\\r"; break;
        case '\t': escape = "\\t"; break;
        default:
            if (c < 0x20) {
                memcpy(unicode, "\\u00", 4);
                unicode[4] = hex[c >> 4];
                unicode[5] = hex[c & 0xF];
                unicode[6] = '\0';
                escape = unicode;
            }
        }
        if (escape != NULL) {
            json_buf_bytes(buf, bytes + run, i - run);
            json_buf_text(buf, escape);
            run = i + 1;
        }
    }
    json_buf_bytes(buf, bytes + run, len - run);
    json_buf_bytes(buf, "\"", 1);
}

void json_buf_i64(json_buf *buf, int64_t value) {
    char digits[21];
    size_t at = sizeof digits;
    uint64_t n = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
    do {
        digits[--at] = (char)('0' + n % 10);
        n /= 10;
    } while (n != 0);
    if (value < 0) digits[--at] = '-';
    json_buf_bytes(buf, digits + at, sizeof digits - at);
}

void json_buf_free(json_buf *buf) {
    free(buf->ptr);
    buf->ptr = NULL;
    buf->len = buf->cap = 0;
}
