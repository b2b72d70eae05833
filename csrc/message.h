#pragma once
// Note [Messages without iostreams]: error messages are built by plain string
// appends (numbers through std::to_string / snprintf), never by c10::str's
// std::ostringstream in this library's own code. On the first H200 run
// (benchmarks/RESULTS.md, 2026-11-28; torch 2.11, the image's /opt/gcc
// toolchain) every error whose message formatted a number or a shape killed
// the process with a segmentation fault, while one whose message held only
// strings raised normally: the stream's number formatting (locale facets) in
// code compiled there was the common factor. Unconfirmed as the cause; this
// keeps numbers out of streams either way, and the texts are what c10::str
// printed (doubles as %g, c10's names for dtypes and devices, shapes as [a, b]).
// A single std::string argument passes through TORCH_CHECK untouched.
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace ssl_ops {
namespace message_detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? '1' : '0'; }  // as an ostream prints it
// Types whose ostream text would differ or is not c10::str's: say what to pass.
void append(std::string&, signed char) = delete;    // a character or a number? cast to int
void append(std::string&, unsigned char) = delete;  // likewise
void append(std::string&, c10::DeviceType) = delete;  // pass c10::DeviceTypeName(type, lower_case)
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char> && !std::is_same_v<T, signed char> &&
                                           !std::is_same_v<T, unsigned char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", static_cast<double>(v));  // an ostream's default
  s += buffer;
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, c10::Device v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

}  // namespace message_detail

// The concatenation of the arguments' texts, as c10::str would print them.
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (message_detail::append(s, args), ...);
  return s;
}

}  // namespace ssl_ops
