// compact on CPU: count, then copy each kept row as one memcpy.
#include <cstring>
#include <torch/library.h>

#include "compact.h"

namespace occam {

std::tuple<at::Tensor, at::Tensor> compact_cpu(const at::Tensor& x, const at::Tensor& keep,
                                               const at::Tensor& index) {
  check_compact_inputs(x, keep, index);
  const RowLayout layout = row_layout(x);
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor index_c = index.contiguous();
  // Read as bytes: a mask viewed as bool (mask_bytes.view(torch.bool)) may hold any nonzero
  // byte, which x[keep] takes as true; added as a bool it counted 2 for a byte 2.
  const uint8_t* keep_ptr = reinterpret_cast<const uint8_t*>(keep_c.data_ptr<bool>());
  int64_t kept = 0;
  for (int64_t i = 0; i < layout.rows; ++i) kept += keep_ptr[i] != 0;

  at::Tensor out = empty_rows(layout, kept);
  at::Tensor index_out = at::empty({kept}, index.options());
  const char* src = static_cast<const char*>(layout.x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* index_in = index_c.data_ptr<int64_t>();
  int64_t* index_dst = index_out.data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t i = 0; i < layout.rows; ++i) {
    if (keep_ptr[i] == 0) continue;
    if (layout.row_bytes > 0) {
      std::memcpy(dst + next * layout.row_bytes, src + i * layout.row_bytes, layout.row_bytes);
    }
    index_dst[next++] = index_in[i];
  }
  return {out, index_out};
}

TORCH_LIBRARY_IMPL(occam, CPU, m) { m.impl("compact", &compact_cpu); }

}  // namespace occam
