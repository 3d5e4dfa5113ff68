// Crash-safe file replacement, used by every kmoe writer (checkpoints, safetensors export): the
// new contents go to a temporary file in the target's folder, which is flushed to disk (fsync),
// renamed over the target (atomic on POSIX file systems) and the folder fsync-ed. A writer killed
// at any moment leaves either the old file or the new one, never a mixture (and a temporary file,
// which the next write removes); a failed write (disk full, unwritable folder) removes the
// temporary file and leaves the old one untouched.
#pragma once

#include "kmoe/dist/communicator.hpp"

#include <functional>
#include <string>

namespace kmoe::io {

// Calls write(temporary_path) to create and fill the temporary file (closing it before it
// returns), then makes it durable and renames it to path. Throws Status::io_error naming path
// and the failing step (errno's text); an exception from write is passed on after the
// temporary file is removed.
//
// Over several ranks (a parallel HDF5 file written collectively), every rank calls it with the
// same path: rank 0 checks the folder and picks the temporary name, every rank's write(temporary)
// runs (collectively: an error on one rank is an error on every rank, and rank 0 removes the
// temporary file), then rank 0 alone flushes and renames. The one-rank communicator is the case
// above.
void write_atomically(const std::string& path, const std::function<void(const std::string& temporary_path)>& write,
                      const dist::Communicator& comm = {});

// The temporary name write_atomically uses for path: "<folder>/.<name>.tmp-<host>-<pid>-<counter>".
// Before writing, write_atomically removes the ones of this host whose process is gone (writers
// killed mid-save).
std::string temporary_path_for(const std::string& path);

}  // namespace kmoe::io
