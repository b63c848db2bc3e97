// The kv state machine in C++: the same JSON commands, answers and stored
// bytes as the Rust kv guest (guests/kv), so the two keep the same state
// digest. Built with clang++ (C++23, no exceptions) for wasm32-wasi against
// wasi-libc and libc++; the component imports nothing but raft:host.
//
// It calls the host through wit-bindgen's C bindings: the C++ generator of
// wit-bindgen 0.63 emits code that does not compile for an
// `option<list<u8>>` parameter (scan's `end`), so a small C++ layer here
// (HostBytes, Borrow, Lookup, Write, Scan) owns what the C functions hand over.
//
// - {"op":"put","key":K,"value":V}               -> {"previous":V_or_null}
//   with "return_previous":false                 -> {}
// - {"op":"delete","key":K}                      -> {"deleted":true_or_false}
// - {"op":"cas","key":K,"expected":V_or_null,"value":V}
//                                                -> {"ok":true} or {"ok":false,"current":V_or_null}
// - query {"op":"get","key":K}                   -> {"value":V_or_null}
// - query {"op":"range","start":K,"end":K_or_null,"limit":N}
//                                                -> {"items":[{"key":K,"value":V},...]}
//
// State lives in the host's store (raft::host::kv), never in C++ objects: the
// host may re-create the instance between any two calls.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <expected>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "state_machine.h"

namespace {

constexpr uint32_t kRangeLimitMax = 10'000;
constexpr int kDepthMax = 128;

template <class T>
using Result = std::expected<T, std::string>;

std::unexpected<std::string> Invalid(std::string_view why) {
  return std::unexpected("invalid JSON: " + std::string(why));
}

// ---- JSON, read strictly (what serde_json refuses is refused here) ----

struct Null {};
struct Number {
  std::string_view text;
};
struct Nested {};  // an array or an object inside the top-level one
using Value = std::variant<Null, bool, Number, std::string, Nested>;

class Reader {
 public:
  explicit Reader(std::string_view text) : text_(text) {}

  // The top-level object's fields, in order, names unique.
  Result<std::vector<std::pair<std::string, Value>>> Object() {
    std::vector<std::pair<std::string, Value>> fields;
    SkipSpace();
    if (!Eat('{')) return Invalid("expected an object");
    SkipSpace();
    if (!Eat('}')) {
      for (;;) {
        SkipSpace();
        if (Peek() != '"') return Invalid("expected a field name");
        auto name = String();
        if (!name) return std::unexpected(name.error());
        for (const auto& [seen, _] : fields) {
          if (seen == *name) return Invalid("duplicate field `" + *name + "`");
        }
        SkipSpace();
        if (!Eat(':')) return Invalid("expected `:`");
        auto value = Parse(1);
        if (!value) return std::unexpected(value.error());
        fields.emplace_back(std::move(*name), std::move(*value));
        SkipSpace();
        if (Eat(',')) continue;
        if (Eat('}')) break;
        return Invalid("expected `,` or `}`");
      }
    }
    SkipSpace();
    if (at_ != text_.size()) return Invalid("trailing characters");
    return fields;
  }

 private:
  char Peek() const { return at_ < text_.size() ? text_[at_] : '\0'; }
  bool Eat(char c) {
    if (at_ < text_.size() && text_[at_] == c) {
      ++at_;
      return true;
    }
    return false;
  }
  void SkipSpace() {
    while (at_ < text_.size() && std::strchr(" \t\n\r", text_[at_]) != nullptr && text_[at_] != '\0') ++at_;
  }

  Result<Value> Parse(int depth) {
    SkipSpace();
    if (at_ >= text_.size()) return Invalid("EOF while parsing a value");
    char c = text_[at_];
    if (c == '"') {
      auto text = String();
      if (!text) return std::unexpected(text.error());
      return Value(std::move(*text));
    }
    if (c == '{' || c == '[') {
      if (depth + 1 > kDepthMax) return Invalid("recursion limit exceeded");
      return SkipNested(depth + 1, c == '{' ? '}' : ']');
    }
    if (Literal("null")) return Value(Null{});
    if (Literal("true")) return Value(true);
    if (Literal("false")) return Value(false);
    if (c == '-' || (c >= '0' && c <= '9')) return NumberValue();
    return Invalid("expected a value");
  }

  bool Literal(std::string_view word) {
    if (text_.substr(at_).starts_with(word)) {
      at_ += word.size();
      return true;
    }
    return false;
  }

  Result<Value> SkipNested(int depth, char close) {
    ++at_;
    SkipSpace();
    if (Eat(close)) return Value(Nested{});
    for (;;) {
      if (close == '}') {
        SkipSpace();
        if (Peek() != '"') return Invalid("expected a field name");
        if (auto name = String(); !name) return std::unexpected(name.error());
        SkipSpace();
        if (!Eat(':')) return Invalid("expected `:`");
      }
      if (auto value = Parse(depth); !value) return value;
      SkipSpace();
      if (Eat(',')) continue;
      if (Eat(close)) return Value(Nested{});
      return Invalid(close == '}' ? "expected `,` or `}`" : "expected `,` or `]`");
    }
  }

  bool Digits() {
    size_t start = at_;
    while (at_ < text_.size() && text_[at_] >= '0' && text_[at_] <= '9') ++at_;
    return at_ > start;
  }

  Result<Value> NumberValue() {
    size_t start = at_;
    Eat('-');
    if (!Eat('0') && !Digits()) return Invalid("invalid number");
    if (Eat('.') && !Digits()) return Invalid("invalid number");
    if (Eat('e') || Eat('E')) {
      if (!Eat('+')) Eat('-');
      if (!Digits()) return Invalid("invalid number");
    }
    return Value(Number{text_.substr(start, at_ - start)});
  }

  std::optional<uint32_t> Hex4() {
    if (text_.size() - at_ < 4) return std::nullopt;
    uint32_t unit = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[at_++];
      int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (digit < 0) return std::nullopt;
      unit = unit << 4 | static_cast<uint32_t>(digit);
    }
    return unit;
  }

  static void AppendUtf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | code >> 6);
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | code >> 12);
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | code >> 18);
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  Result<std::string> String() {
    std::string out;
    ++at_;  // the opening quote
    while (at_ < text_.size()) {
      auto c = static_cast<unsigned char>(text_[at_]);
      if (c == '"') {
        ++at_;
        return out;
      }
      if (c < 0x20) return Invalid("control character in a string");
      if (c != '\\') {
        size_t length = Utf8Length(text_.substr(at_));
        if (length == 0) return Invalid("invalid UTF-8 in a string");
        out.append(text_.substr(at_, length));
        at_ += length;
        continue;
      }
      ++at_;
      char escape = Peek();
      ++at_;
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          auto unit = Hex4();
          if (!unit) return Invalid("invalid \\u escape");
          if (*unit >= 0xDC00 && *unit <= 0xDFFF) return Invalid("lone trailing surrogate in a \\u escape");
          uint32_t code = *unit;
          if (*unit >= 0xD800 && *unit <= 0xDBFF) {
            std::optional<uint32_t> low;
            if (Eat('\\') && Eat('u')) low = Hex4();
            if (!low || *low < 0xDC00 || *low > 0xDFFF) return Invalid("lone leading surrogate in a \\u escape");
            code = 0x10000 + ((*unit - 0xD800) << 10) + (*low - 0xDC00);
          }
          AppendUtf8(out, code);
          break;
        }
        default:
          return Invalid("invalid escape");
      }
    }
    return Invalid("unterminated string");
  }

 public:
  // The length of the UTF-8 sequence that starts `text`, or 0.
  static size_t Utf8Length(std::string_view text) {
    auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
    unsigned char lead = byte(0);
    size_t need;
    uint32_t code, min;
    if (lead < 0x80) return 1;
    if ((lead & 0xE0) == 0xC0) { need = 2; min = 0x80; code = lead & 0x1F; }
    else if ((lead & 0xF0) == 0xE0) { need = 3; min = 0x800; code = lead & 0x0F; }
    else if ((lead & 0xF8) == 0xF0) { need = 4; min = 0x10000; code = lead & 0x07; }
    else return 0;
    if (text.size() < need) return 0;
    for (size_t i = 1; i < need; ++i) {
      if ((byte(i) & 0xC0) != 0x80) return 0;
      code = code << 6 | (byte(i) & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return 0;
    return need;
  }

 private:
  std::string_view text_;
  size_t at_ = 0;
};

bool IsUtf8(std::string_view text) {
  while (!text.empty()) {
    size_t length = Reader::Utf8Length(text);
    if (length == 0) return false;
    text.remove_prefix(length);
  }
  return true;
}

// ---- JSON, written compactly and escaped like serde_json ----

void Quote(std::string& out, std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 0xF];
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

void QuoteOrNull(std::string& out, const std::optional<std::string>& text) {
  if (text) {
    Quote(out, *text);
  } else {
    out += "null";
  }
}

// ---- A command's fields, checked like serde's derive ----

class Fields {
 public:
  explicit Fields(std::vector<std::pair<std::string, Value>> fields) : fields_(std::move(fields)) {}

  // Refuses any field not named in `allowed`.
  Result<void> Only(std::initializer_list<std::string_view> allowed) const {
    for (const auto& [name, _] : fields_) {
      if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
        return Invalid("unknown field `" + name + "`");
      }
    }
    return {};
  }

  const Value* Find(std::string_view name) const {
    for (const auto& [field, value] : fields_) {
      if (field == name) return &value;
    }
    return nullptr;
  }

  Result<std::string> Text(std::string_view name) const {
    const Value* value = Find(name);
    if (value == nullptr) return Invalid("missing field `" + std::string(name) + "`");
    if (const auto* text = std::get_if<std::string>(value)) return *text;
    return Invalid("field `" + std::string(name) + "` is not a string");
  }

  // A string, null, or absent (absent and null are both "none").
  Result<std::optional<std::string>> TextOrNull(std::string_view name) const {
    const Value* value = Find(name);
    if (value == nullptr || std::holds_alternative<Null>(*value)) return std::optional<std::string>();
    if (const auto* text = std::get_if<std::string>(value)) return std::optional<std::string>(*text);
    return Invalid("field `" + std::string(name) + "` is not a string or null");
  }

  // A boolean, or `absent` when the field is not there.
  Result<bool> BoolOr(std::string_view name, bool absent) const {
    const Value* value = Find(name);
    if (value == nullptr) return absent;
    if (const auto* flag = std::get_if<bool>(value)) return *flag;
    return Invalid("field `" + std::string(name) + "` is not a boolean");
  }

  Result<uint32_t> U32(std::string_view name) const {
    const Value* value = Find(name);
    if (value == nullptr) return Invalid("missing field `" + std::string(name) + "`");
    const auto* number = std::get_if<Number>(value);
    auto refused = Invalid("field `" + std::string(name) + "` is not an integer from 0 to 4294967295");
    if (number == nullptr) return refused;
    std::string_view digits = number->text;
    bool negative = digits.starts_with('-');
    if (negative) digits.remove_prefix(1);
    uint64_t n = 0;
    for (char c : digits) {
      if (c < '0' || c > '9') return refused;
      n = n * 10 + static_cast<uint64_t>(c - '0');
      if (n > UINT32_MAX) return refused;
    }
    if (negative && n != 0) return refused;
    return static_cast<uint32_t>(n);
  }

 private:
  std::vector<std::pair<std::string, Value>> fields_;
};

// ---- The store, through wit-bindgen's C bindings ----

// An owned byte list the host allocated (an answer of `get` or `scan`).
class HostBytes {
 public:
  explicit HostBytes(state_machine_list_u8_t bytes) : bytes_(bytes) {}
  HostBytes(const HostBytes&) = delete;
  HostBytes& operator=(const HostBytes&) = delete;
  ~HostBytes() { state_machine_list_u8_free(&bytes_); }
  std::string_view View() const { return {reinterpret_cast<const char*>(bytes_.ptr), bytes_.len}; }

 private:
  state_machine_list_u8_t bytes_;
};

// A borrowed view of `text` in the bindings' list type; imports do not keep
// or free their arguments.
state_machine_list_u8_t Borrow(std::string_view text) {
  return {reinterpret_cast<uint8_t*>(const_cast<char*>(text.data())), text.size()};
}

std::optional<std::string> Lookup(std::string_view key) {
  state_machine_list_u8_t k = Borrow(key), value;
  if (!raft_host_kv_get(&k, &value)) return std::nullopt;
  return std::string(HostBytes(value).View());
}

Result<std::optional<std::string>> Read(const std::string& key) {
  auto value = Lookup(key);
  if (value && !IsUtf8(*value)) {
    std::string message = "value of ";
    Quote(message, key);
    return std::unexpected(message + " is not UTF-8");
  }
  return value;
}

std::unexpected<std::string> Refused(raft_host_kv_kv_error_t& error) {
  if (error.tag == RAFT_HOST_KV_KV_ERROR_TOO_LARGE) {
    std::string message(reinterpret_cast<const char*>(error.val.too_large.ptr), error.val.too_large.len);
    raft_host_kv_kv_error_free(&error);
    return std::unexpected(message);
  }
  return std::unexpected(std::string("kv is read-only here (writes are allowed in apply and migrate)"));
}

Result<void> Write(const std::string& key, const std::optional<std::string>& value) {
  state_machine_list_u8_t k = Borrow(key);
  raft_host_kv_kv_error_t error;
  if (value) {
    state_machine_list_u8_t v = Borrow(*value);
    if (!raft_host_kv_set(&k, &v, &error)) return Refused(error);
  } else if (!raft_host_kv_delete(&k, &error)) {
    return Refused(error);
  }
  return {};
}

// `limit` pairs at most from `start` (to `end`, if any), in key order.
std::vector<std::pair<std::string, std::string>> Scan(const std::string& start, const std::optional<std::string>& end,
                                                      uint32_t limit) {
  state_machine_list_u8_t s = Borrow(start), e;
  if (end) e = Borrow(*end);
  raft_host_kv_list_pair_t pairs;
  raft_host_kv_scan(&s, end ? &e : nullptr, limit, &pairs);
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(pairs.len);
  for (size_t i = 0; i < pairs.len; ++i) {
    const raft_host_kv_pair_t& pair = pairs.ptr[i];
    out.emplace_back(std::string(reinterpret_cast<const char*>(pair.key.ptr), pair.key.len),
                     std::string(reinterpret_cast<const char*>(pair.value.ptr), pair.value.len));
  }
  raft_host_kv_list_pair_free(&pairs);
  return out;
}

// ---- Commands and queries ----

Result<std::string> Put(const Fields& fields) {
  if (auto only = fields.Only({"op", "key", "value", "return_previous"}); !only) return std::unexpected(only.error());
  auto key = fields.Text("key");
  if (!key) return std::unexpected(key.error());
  auto value = fields.Text("value");
  if (!value) return std::unexpected(value.error());
  auto return_previous = fields.BoolOr("return_previous", true);
  if (!return_previous) return std::unexpected(return_previous.error());
  if (!*return_previous) {
    if (auto written = Write(*key, *value); !written) return std::unexpected(written.error());
    return "{}";
  }
  auto previous = Read(*key);
  if (!previous) return std::unexpected(previous.error());
  if (auto written = Write(*key, *value); !written) return std::unexpected(written.error());
  std::string out = "{\"previous\":";
  QuoteOrNull(out, *previous);
  return out + "}";
}

Result<std::string> Delete(const Fields& fields) {
  if (auto only = fields.Only({"op", "key"}); !only) return std::unexpected(only.error());
  auto key = fields.Text("key");
  if (!key) return std::unexpected(key.error());
  bool existed = Lookup(*key).has_value();
  if (auto written = Write(*key, std::nullopt); !written) return std::unexpected(written.error());
  return std::string(existed ? "{\"deleted\":true}" : "{\"deleted\":false}");
}

Result<std::string> Cas(const Fields& fields) {
  if (auto only = fields.Only({"op", "key", "expected", "value"}); !only) return std::unexpected(only.error());
  auto key = fields.Text("key");
  if (!key) return std::unexpected(key.error());
  auto expected = fields.TextOrNull("expected");
  if (!expected) return std::unexpected(expected.error());
  auto value = fields.Text("value");
  if (!value) return std::unexpected(value.error());
  auto current = Read(*key);
  if (!current) return std::unexpected(current.error());
  if (*current == *expected) {
    if (auto written = Write(*key, *value); !written) return std::unexpected(written.error());
    return std::string("{\"ok\":true}");
  }
  std::string out = "{\"ok\":false,\"current\":";
  QuoteOrNull(out, *current);
  return out + "}";
}

Result<std::string> Get(const Fields& fields) {
  if (auto only = fields.Only({"op", "key"}); !only) return std::unexpected(only.error());
  auto key = fields.Text("key");
  if (!key) return std::unexpected(key.error());
  auto value = Read(*key);
  if (!value) return std::unexpected(value.error());
  std::string out = "{\"value\":";
  QuoteOrNull(out, *value);
  return out + "}";
}

Result<std::string> Range(const Fields& fields) {
  if (auto only = fields.Only({"op", "start", "end", "limit"}); !only) return std::unexpected(only.error());
  auto start = fields.Text("start");
  if (!start) return std::unexpected(start.error());
  auto end = fields.TextOrNull("end");
  if (!end) return std::unexpected(end.error());
  auto limit = fields.U32("limit");
  if (!limit) return std::unexpected(limit.error());
  auto pairs = Scan(*start, *end, std::min(*limit, kRangeLimitMax));
  std::string out = "{\"items\":[";
  for (size_t i = 0; i < pairs.size(); ++i) {
    const auto& [key, value] = pairs[i];
    if (!IsUtf8(key)) return std::unexpected(std::string("a key is not UTF-8"));
    if (!IsUtf8(value)) {
      std::string message = "value of ";
      Quote(message, key);
      return std::unexpected(message + " is not UTF-8");
    }
    out += i == 0 ? "{\"key\":" : ",{\"key\":";
    Quote(out, key);
    out += ",\"value\":";
    Quote(out, value);
    out += '}';
  }
  return out + "]}";
}

using Handler = Result<std::string> (*)(const Fields&);

Result<std::string> Dispatch(std::initializer_list<std::pair<std::string_view, Handler>> operations,
                             const state_machine_list_u8_t& input) {
  auto parsed = Reader({reinterpret_cast<const char*>(input.ptr), input.len}).Object();
  if (!parsed) return std::unexpected(parsed.error());
  Fields fields(std::move(*parsed));
  const Value* op = fields.Find("op");
  if (op == nullptr) return Invalid("missing field `op`");
  const auto* name = std::get_if<std::string>(op);
  if (name == nullptr) return Invalid("field `op` is not a string");
  for (const auto& [operation, handler] : operations) {
    if (*name == operation) return handler(fields);
  }
  return Invalid("unknown variant `" + *name + "`");
}

// A copy the host frees after the call.
uint8_t* Copy(const std::string& text) {
  auto* bytes = static_cast<uint8_t*>(std::malloc(text.empty() ? 1 : text.size()));
  if (bytes == nullptr) __builtin_trap();  // out of memory ends the call like a trap, on every replica
  std::memcpy(bytes, text.data(), text.size());
  return bytes;
}

bool Export(const Result<std::string>& outcome, state_machine_list_u8_t* ret, state_machine_string_t* err) {
  if (!outcome) {
    *err = {Copy(outcome.error()), outcome.error().size()};
    return false;
  }
  *ret = {Copy(*outcome), outcome->size()};
  return true;
}

}  // namespace

// libc++'s own operator new and its assertion handler report failures on
// stderr, which would make the module import WASI preview 1 (fd_write and
// the rest) for a message no one reads. These replacements (the standard
// allows replacing operator new and delete, and libc++ lets a program define
// its verbose abort) end the call as a trap does instead, on every replica
// alike.
void* operator new(std::size_t size) {
  void* memory = std::malloc(size == 0 ? 1 : size);
  if (memory == nullptr) __builtin_trap();
  return memory;
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* memory) noexcept { std::free(memory); }
void operator delete[](void* memory) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t) noexcept { std::free(memory); }
namespace std {
inline namespace __2 {
[[noreturn]] void __libcpp_verbose_abort(char const*, ...) { __builtin_trap(); }
}  // namespace __2
}  // namespace std

// The exports, with the C linkage the bindings declare; the host owns (and
// frees) the arguments it passed once they are read.
bool exports_state_machine_apply(state_machine_list_u8_t* command, state_machine_list_u8_t* ret,
                                 state_machine_string_t* err) {
  auto outcome = Dispatch({{"put", Put}, {"delete", Delete}, {"cas", Cas}}, *command);
  state_machine_list_u8_free(command);
  return Export(outcome, ret, err);
}

bool exports_state_machine_query(state_machine_list_u8_t* request, state_machine_list_u8_t* ret,
                                 state_machine_string_t* err) {
  auto outcome = Dispatch({{"get", Get}, {"range", Range}}, *request);
  state_machine_list_u8_free(request);
  return Export(outcome, ret, err);
}

bool exports_state_machine_migrate(state_machine_string_t* previous, state_machine_string_t*) {
  state_machine_string_free(previous);
  return true;
}
