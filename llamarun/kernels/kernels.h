// What one source file of the extension offers the others (linear.cpp holds the Python module).
#pragma once

#include <torch/extension.h>

namespace llamarun {

bool attend_supported();  // the CPU has what attend's code needs (AVX2, FMA)
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& rows, const torch::Tensor& pos, double scale);

}  // namespace llamarun
