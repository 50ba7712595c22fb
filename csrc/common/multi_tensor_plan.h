// A built multi-tensor table (common/multi_tensor.h) held in a tensor, as the host code of every
// op sees it: the EMA plan cache and the optimizer steps share this type.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/multi_tensor.h"

namespace eman_fused {

template <typename Entry>
struct MultiTensorPlan {
  at::Tensor table;  // int64: [Entry x num_tensors][TensorChunk x num_chunks]
  int64_t num_tensors = 0;
  int64_t num_chunks = 0;

  const Entry* entries() const { return reinterpret_cast<const Entry*>(words()); }
  const TensorChunk* chunks() const {
    return reinterpret_cast<const TensorChunk*>(words() + num_tensors * entry_words<Entry>());
  }

 private:
  const int64_t* words() const { return table.const_data_ptr<int64_t>(); }
};

}  // namespace eman_fused
