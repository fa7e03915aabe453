// Spans of one buffer handed out as a ring: taken in order, given back oldest first. Where
// work flows through a bounded buffer in order (read ahead, then consume; stage, then write),
// this places each item without allocating, and never lets two live spans overlap. Offsets
// only: the caller owns the memory (and aligns sizes as it needs).
#pragma once
#include <cstddef>
#include <deque>
#include <optional>

namespace difftron {

class RingSpans {
 public:
  explicit RingSpans(size_t capacity) : capacity_(capacity) {}

  size_t capacity() const { return capacity_; }
  bool empty() const { return spans_.empty(); }
  size_t live() const { return spans_.size(); }

  // The offset of `bytes` contiguous bytes after the newest span (wrapping to the start when
  // the end has no room), or nothing while older spans hold them.
  std::optional<size_t> take(size_t bytes) {
    size_t at = 0;
    if (!spans_.empty()) {
      const Span &oldest = spans_.front(), &newest = spans_.back();
      const size_t end = newest.at + newest.bytes;
      if (oldest.at <= newest.at) {  // the spans lie in [oldest.at, end): after them, or wrap
        if (capacity_ - end >= bytes) at = end;
        else if (oldest.at >= bytes) at = 0;
        else return std::nullopt;
      } else if (oldest.at - end >= bytes) {  // wrapped: only [end, oldest.at) is free
        at = end;
      } else {
        return std::nullopt;
      }
    } else if (bytes > capacity_) {
      return std::nullopt;
    }
    spans_.push_back({at, bytes});
    return at;
  }

  void give_back_oldest() { spans_.pop_front(); }

 private:
  struct Span {
    size_t at, bytes;
  };
  size_t capacity_;
  std::deque<Span> spans_;
};

}  // namespace difftron
