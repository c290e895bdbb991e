// Shared declarations of the compact op: input validation and the row layout both
// implementations (CPU and CUDA) agree on.
#pragma once
#include <ATen/ATen.h>

namespace occam {

// Rows are copied as raw bytes, so every dtype works; a tensor that is contiguous or
// channels_last keeps its memory format (each sample is one dense block either way).
struct RowLayout {
  at::Tensor x;                 // x, or a contiguous copy when its rows are not dense blocks
  at::MemoryFormat format;
  int64_t rows;
  int64_t row_bytes;
};

inline void check_compact_inputs(const at::Tensor& x, const at::Tensor& keep,
                                 const at::Tensor& index) {
  TORCH_CHECK(x.dim() >= 1, "compact: x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(keep.scalar_type() == at::kBool,
              "compact: keep must be a bool tensor, got ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == x.size(0),
              "compact: keep must have shape (", x.size(0), ",) to match x's batch size, got ",
              keep.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong,
              "compact: index must be an int64 tensor, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0),
              "compact: index must have shape (", x.size(0), ",) to match x's batch size, got ",
              index.sizes());
  TORCH_CHECK(keep.device() == x.device() && index.device() == x.device(),
              "compact: x, keep and index must be on one device, got x on ", x.device(),
              ", keep on ", keep.device(), ", index on ", index.device());
}

inline RowLayout row_layout(const at::Tensor& x) {
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  at::Tensor dense = x;
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    format = at::MemoryFormat::ChannelsLast;
  } else if (!x.is_contiguous()) {
    dense = x.contiguous();
  }
  const int64_t rows = x.size(0);
  const int64_t row_bytes = rows == 0 ? 0 : x.numel() / rows * x.element_size();
  return {dense, format, rows, row_bytes};
}

inline at::Tensor empty_rows(const RowLayout& layout, int64_t rows) {
  auto sizes = layout.x.sizes().vec();
  sizes[0] = rows;
  return at::empty(sizes, layout.x.options().memory_format(layout.format));
}

}  // namespace occam
