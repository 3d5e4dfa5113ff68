// Cross-entropy with logits, as torch.nn.functional.cross_entropy(reduction="mean").
#pragma once

#include "kmoe/core/config.hpp"

namespace kmoe::ops {

// Mean over rows whose target is not ignore_index of −log softmax(logits[row])[target]; returns
// the loss and keeps each row's logsumexp ([rows]) for backward. A target outside [0, classes)
// other than ignore_index throws Status::invalid_argument. No valid row gives NaN (as PyTorch).
template <class T>
T cross_entropy_forward(const View2<const T>& logits, const View1<const int>& targets, int ignore_index,
                        const View1<T>& row_logsumexp);

// dlogits = dloss · (softmax(logits) − onehot(target)) / n_valid; zero rows for ignored targets.
template <class T>
void cross_entropy_backward(const View2<const T>& logits, const View1<const int>& targets, int ignore_index,
                            const View1<const T>& row_logsumexp, T dloss, const View2<T>& dlogits);

}  // namespace kmoe::ops
