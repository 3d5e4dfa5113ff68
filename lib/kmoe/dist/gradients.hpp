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

}  // namespace kmoe::dist
