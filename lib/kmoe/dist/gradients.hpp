// Gradient synchronisation over the registry: after every rank's backward, the dense entries'
// gradients (routers, norms, projections, embeddings: the parameters every rank holds) are summed
// over the ranks, so every rank holds the gradient of the whole batch's loss. Expert entries are
// left alone: their owners' gradients already include every rank's tokens (the exchange brought
// them). Buffers have no gradient.
#pragma once

#include "kmoe/dist/communicator.hpp"
#include "kmoe/model/parameter.hpp"

namespace kmoe::dist {

template <class T>
void all_reduce_dense_gradients(const Communicator& comm, const model::ParameterList<T>& parameters);

}  // namespace kmoe::dist
