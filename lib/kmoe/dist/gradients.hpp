// Gradient synchronisation over the registry: after every rank's backward, the gradients of the
// entries every rank holds whole (routers, norms, projections, embeddings, and experts a layer
// keeps on every rank, as MoEUT's attention experts) are summed over the ranks, so every rank
// holds the gradient of the whole batch's loss. Entries held in part (placed experts) are left
// alone: their owners' gradients already include every rank's tokens (the exchange brought them).
// Buffers have no gradient.
#pragma once

#include "kmoe/dist/communicator.hpp"
#include "kmoe/model/parameter.hpp"

namespace kmoe::dist {

template <class T>
void all_reduce_dense_gradients(const Communicator& comm, const model::ParameterList<T>& parameters);

// The L2 norm of the whole model's gradient over every rank (each dense entry once, each expert
// block once: shards' copies of entries without a hidden axis are not counted), after
// all_reduce_dense_gradients. When it exceeds max_norm (> 0), every gradient is scaled by
// max_norm / norm (PyTorch's clip_grad_norm_). Returns the norm before clipping; collective.
template <class T>
double clip_gradients_by_global_norm(const Communicator& comm, const model::ParameterList<T>& parameters,
                                     double max_norm);

}  // namespace kmoe::dist
