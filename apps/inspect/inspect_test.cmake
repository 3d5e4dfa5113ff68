# Inspect.<case>: runs kmoe-inspect on checkpoints made (and damaged) by kmoe-make-checkpoint and
# fails unless its exit status and output are the expected ones.
#   cmake -DCASE=<case> -DINSPECT=<kmoe-inspect> -DMAKER=<kmoe-make-checkpoint> -DSCRATCH=<folder>
#         -DFOREIGN=<an HDF5 file that is not a kmoe checkpoint> -DTEXT=<a text file> -P inspect_test.cmake
# Cases:
#   report                the table: parameter names, expert ranges, totals, the optional parts
#   stats                 min, max, mean, std, l2 of 0, 1, 2, ... against their closed forms
#   json                  --json parses and holds the same information
#   verify_ok             --verify of a good checkpoint: 0 and the OK line
#   verify_optimizer      --verify with /optimizer, /rng, /train: every dataset read
#   verify_corrupt        a byte flipped in /params/keys: 1, naming the dataset
#   verify_truncated      half the file: 1, truncated or damaged
#   verify_missing_param  /params/values deleted: 1 under --verify, naming the parameter
#   verify_non_finite     a NaN and an Inf in /params/expert_sel: counted; 1 under --verify
#   not_kmoe, text_file, missing_file   2 with the reason
#   diff_same             a checkpoint against itself and against a remake: 0
#   diff_seeds            different seeds: 1 with a non-zero max abs for keys; dataset only in one
#   h5ls                  h5ls -r lists /params/keys ... (skipped without h5ls)
#   help, unknown_option  --help: 0 and the usage; an unknown option or no file: 2
foreach(var CASE INSPECT MAKER SCRATCH)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "inspect_test.cmake needs -D${var}=... (see its header)")
  endif()
endforeach()

set(dir ${SCRATCH}/${CASE})
file(REMOVE_RECURSE ${dir})
file(MAKE_DIRECTORY ${dir})
set(config "{\"dmodel\": 16, \"n_experts\": 4, \"expert_size\": 8, \"k\": 2}")

# make_checkpoint(OUT SEED [--with-optimizer]) / maker(ARGS...): kmoe-make-checkpoint or fail.
function(maker)
  execute_process(COMMAND ${MAKER} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kmoe-make-checkpoint ${ARGN} failed (${rc}): ${out}")
  endif()
endfunction()
function(make_checkpoint out seed)
  maker(sigma_moe "${config}" ${seed} ${out} ${ARGN})
endfunction()

# inspect(EXPECT_CODE REGEX... ARGS args...): runs kmoe-inspect ARGS; its status must be
# EXPECT_CODE ("nonzero": any but 0) and its output (stdout and stderr together) must match every
# REGEX. Leaves the output in `out` (and stdout alone in `stdout`) in the caller's scope.
function(inspect code)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "MATCH;ARGS")
  execute_process(COMMAND ${INSPECT} ${arg_ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
  set(all "${stdout}${stderr}")
  string(JOIN " " command ${arg_ARGS})
  message("$ kmoe-inspect ${command}  -> ${rc}\n${all}")
  if(code STREQUAL "nonzero")
    if(rc EQUAL 0 OR NOT rc MATCHES "^[0-9]+$")
      message(FATAL_ERROR "kmoe-inspect ${arg_ARGS} exited with ${rc}, expected a non-zero status")
    endif()
  elseif(NOT rc STREQUAL code)
    message(FATAL_ERROR "kmoe-inspect ${arg_ARGS} exited with ${rc}, expected ${code}")
  endif()
  foreach(regex IN LISTS arg_MATCH)
    if(NOT all MATCHES "${regex}")
      message(FATAL_ERROR "kmoe-inspect ${arg_ARGS}: the output does not match '${regex}'")
    endif()
  endforeach()
  set(out "${all}" PARENT_SCOPE)
  set(stdout "${stdout}" PARENT_SCOPE)
endfunction()

# expect_json(JSON EXPECTED MEMBER...): the member's value must equal EXPECTED.
function(expect_json text expected)
  string(JSON value ERROR_VARIABLE error GET "${text}" ${ARGN})
  if(error)
    message(FATAL_ERROR "--json output: ${ARGN}: ${error}")
  endif()
  if(NOT value STREQUAL expected)
    message(FATAL_ERROR "--json output: ${ARGN} is '${value}', expected '${expected}'")
  endif()
endfunction()

set(good ${dir}/good.h5)
# keys [experts, dmodel, expert_size], values [experts, expert_size, dmodel], expert_sel [experts, dmodel].
set(number "-?[0-9][-+.e0-9]*")

if(CASE STREQUAL "report")
  make_checkpoint(${good} 1)
  inspect(0 ARGS ${good} MATCH
          "model +sigma_moe\n"
          "config +{[^\n]*\"dmodel\":16,[^\n]*\"expert_size\":8,[^\n]*\"k\":2,[^\n]*\"n_experts\":4,"
          "format +1\n" "dtype +float32\n" "kmoe version +[0-9]+\\.[0-9]+\\.[0-9]+\n"
          "created +[0-9]+-[0-9]+-[0-9]+T[0-9:]+Z\n" "step +0\n"
          "parameters \\(3\\):\n +name +shape +dtype +kind +min +max +mean +std +l2 +nan +inf\n"
          "\n +expert_sel +\\[4, 16\\] +float32 +dense +${number} +${number} +${number} +${number} +${number} +0 +0\n"
          "\n +keys +\\[4, 16, 8\\] +float32 +expert 0-3 +${number} +${number} +${number} +${number} +${number} +0 +0\n"
          "\n +values +\\[4, 8, 16\\] +float32 +expert 0-3 +"
          "totals: 3 parameter tensors, 1088 values, 4352 bytes; file size [1-9][0-9]* bytes\n"
          "optimizer: no\n" "rng: no\n" "train: no\n")
  # Known values: ST-MoE's GEGLU mult_bias starts at ones (l2 = sqrt(4 * 42)); per-expert torch names.
  maker(st_moe "{\"dim\": 16, \"num_experts\": 4}" 1 ${dir}/st_moe.h5)
  inspect(0 ARGS ${dir}/st_moe.h5 MATCH "model +st_moe\n"
          "\n +experts\\.experts\\.\\*\\.net\\.1\\.mult_bias +\\[4, 42\\] +float32 +expert 0-3 +1 +1 +1 +0 +12\\.9615 +0 +0\n"
          "\n +gate\\.to_gates\\.weight +\\[4, 16\\] +float32 +dense +")
elseif(CASE STREQUAL "stats")
  # Statistics against closed forms over many blocks: keys := 0 ... 32767 (n = 32768: mean (n-1)/2,
  # std sqrt((n^2-1)/12), l2 sqrt((n-1) n (2n-1)/6)); then NaN at 0 and Inf at 32767 (1 ... 32766).
  maker(sigma_moe "{\"dmodel\": 64, \"n_experts\": 16, \"expert_size\": 32, \"k\": 2}" 1 ${dir}/wide.h5)
  maker(--ramp ${dir}/wide.h5 ${dir}/ramp.h5 /params/keys)
  inspect(0 ARGS ${dir}/ramp.h5 MATCH
          "\n +keys +\\[16, 64, 32\\] +float32 +expert 0-15 +0 +32767 +16383\\.5 +9459\\.31 +3\\.42456e\\+06 +0 +0\n")
  maker(--poison ${dir}/ramp.h5 ${dir}/ramp_poisoned.h5 /params/keys)
  inspect(0 ARGS ${dir}/ramp_poisoned.h5 MATCH
          "\n +keys +\\[16, 64, 32\\] +float32 +expert 0-15 +1 +32766 +16383\\.5 +9458\\.73 +3\\.4244e\\+06 +1 +1\n")
elseif(CASE STREQUAL "json")
  make_checkpoint(${good} 1)
  inspect(0 ARGS --json ${good})
  expect_json("${stdout}" sigma_moe model)
  expect_json("${stdout}" 16 config dmodel)
  expect_json("${stdout}" 1 format)
  expect_json("${stdout}" float32 dtype)
  expect_json("${stdout}" 0 step)
  string(JSON n LENGTH "${stdout}" parameters)
  if(NOT n EQUAL 3)
    message(FATAL_ERROR "--json lists ${n} parameters, expected 3")
  endif()
  expect_json("${stdout}" expert_sel parameters 0 name)
  expect_json("${stdout}" dense parameters 0 kind)
  expect_json("${stdout}" keys parameters 1 name)
  expect_json("${stdout}" expert parameters 1 kind)
  expect_json("${stdout}" 0-3 parameters 1 expert_range)
  expect_json("${stdout}" 8 parameters 1 shape 2)
  expect_json("${stdout}" 512 parameters 1 stats count)
  expect_json("${stdout}" 0 parameters 1 stats nan)
  expect_json("${stdout}" values parameters 2 name)
  expect_json("${stdout}" 1088 totals values)
  expect_json("${stdout}" 4352 totals bytes)
  string(JSON type TYPE "${stdout}" optimizer)
  if(NOT type STREQUAL "NULL")
    message(FATAL_ERROR "--json: optimizer is ${type}, expected null (no /optimizer)")
  endif()
  # The statistics are those of the values: std and l2 agree with mean (l2^2 = n (std^2 + mean^2)).
  string(JSON mean GET "${stdout}" parameters 1 stats mean)
  string(JSON std GET "${stdout}" parameters 1 stats std)
  string(JSON l2 GET "${stdout}" parameters 1 stats l2)
  if(NOT std MATCHES "^[0-9]" OR NOT l2 MATCHES "^[0-9]" OR l2 STREQUAL "0")
    message(FATAL_ERROR "implausible stats of keys: mean ${mean}, std ${std}, l2 ${l2}")
  endif()
elseif(CASE STREQUAL "verify_ok")
  make_checkpoint(${good} 1)
  inspect(0 ARGS --verify ${good} MATCH "OK: [^\n]*good.h5: 3 datasets verified, checksums and config consistent\n")
  inspect(0 ARGS --json --verify ${good})
  expect_json("${stdout}" ON verify ok)
  expect_json("${stdout}" 3 verify datasets_verified)
elseif(CASE STREQUAL "verify_optimizer")
  make_checkpoint(${good} 7 --with-optimizer)
  inspect(0 ARGS --verify ${good} MATCH
          "optimizer: yes \\(step 0, 6 moment datasets\\)\n" "rng: yes \\(seed 7, position 0\\)\n"
          "train: yes {\"step\":0}\n" "/rng/state +\\[2\\] +uint64 +- +0 +7 +3\\.5 +3\\.5 +7 +0 +0\n"
          "/optimizer/exp_avg_sq/keys +\\[4, 16, 8\\] +float32 +- +0 +0 +0 +0 +0 +0 +0\n"
          "OK: [^\n]*: 10 datasets verified, checksums and config consistent\n")
  make_checkpoint(${dir}/plain.h5 7)
  inspect(1 ARGS --diff ${good} ${dir}/plain.h5 MATCH "/optimizer/exp_avg/keys +\\[4, 16, 8\\] .* only in A\n"
          "/rng/state .* only in A\n" "/params/keys +\\[4, 16, 8\\] +0\\.000e\\+00 +0\\.000e\\+00 +0/512 +identical\n")
elseif(CASE STREQUAL "verify_corrupt")
  make_checkpoint(${good} 1)
  maker(--corrupt ${good} ${dir}/flipped.h5 /params/keys)
  inspect(1 ARGS --verify ${dir}/flipped.h5 MATCH
          "kmoe-inspect: [^\n]*flipped.h5: dataset /params/keys is corrupt \\(checksum mismatch or truncated file\\)\n"
          "verification FAILED: 1 corrupt, 0 inconsistent \\(2 datasets read\\)")
  if(out MATCHES "OK:")
    message(FATAL_ERROR "--verify of a corrupt file printed OK")
  endif()
  # Without --verify the damage is an error too.
  inspect(1 ARGS ${dir}/flipped.h5 MATCH "keys +\\[4, 16, 8\\] +float32 +expert 0-3 +UNREADABLE" "dataset /params/keys is corrupt")
elseif(CASE STREQUAL "verify_truncated")
  make_checkpoint(${good} 1 --with-optimizer)
  maker(--truncate ${good} ${dir}/half.h5)
  inspect(1 ARGS --verify ${dir}/half.h5 MATCH "kmoe-inspect: [^\n]*half.h5: [^\n]*\\(truncated or damaged\\)")
  if(out MATCHES "OK:")
    message(FATAL_ERROR "--verify of a truncated file printed OK")
  endif()
elseif(CASE STREQUAL "verify_missing_param")
  make_checkpoint(${good} 1)
  maker(--drop-dataset ${good} ${dir}/dropped.h5 /params/values)
  inspect(1 ARGS --verify ${dir}/dropped.h5 MATCH
          "kmoe-inspect: [^\n]*dropped.h5: parameter 'values' \\[4, 8, 16\\] of the sigma_moe config is missing from /params\n"
          "verification FAILED: 0 corrupt, 1 inconsistent")
  # Listing alone does not check the config.
  inspect(0 ARGS ${dir}/dropped.h5 MATCH "parameters \\(2\\):")
elseif(CASE STREQUAL "verify_non_finite")
  make_checkpoint(${good} 1)
  maker(--poison ${good} ${dir}/poisoned.h5 /params/expert_sel)
  inspect(0 ARGS ${dir}/poisoned.h5 MATCH "\n +expert_sel +\\[4, 16\\] +float32 +dense +${number} +${number} +${number} +${number} +${number} +1 +1\n"
          "/params/expert_sel holds 1 NaN and 1 Inf values")
  inspect(1 ARGS --verify ${dir}/poisoned.h5 MATCH "kmoe-inspect: [^\n]*: /params/expert_sel holds 1 NaN and 1 Inf values\n"
          "verification FAILED")
  inspect(0 ARGS --json ${dir}/poisoned.h5)
  expect_json("${stdout}" 64 parameters 0 stats count)
  expect_json("${stdout}" 1 parameters 0 stats nan)
  expect_json("${stdout}" 1 parameters 0 stats inf)
elseif(CASE STREQUAL "not_kmoe")
  inspect(2 ARGS ${FOREIGN} MATCH "kmoe-inspect: [^\n]*sigma_moe_sigmoid_relu_train.h5: not a kmoe checkpoint")
  inspect(2 ARGS --verify ${FOREIGN} MATCH "not a kmoe checkpoint")
elseif(CASE STREQUAL "text_file")
  inspect(2 ARGS --verify ${TEXT} MATCH "kmoe-inspect: [^\n]*README.md: cannot open \\(missing, unreadable or not an HDF5 file\\)")
elseif(CASE STREQUAL "missing_file")
  inspect(2 ARGS --verify ${dir}/no_such_checkpoint.h5 MATCH "kmoe-inspect: [^\n]*no_such_checkpoint.h5: no such file")
  make_checkpoint(${good} 1)
  inspect(2 ARGS --diff ${good} ${dir}/no_such_checkpoint.h5 MATCH "no_such_checkpoint.h5: no such file")
elseif(CASE STREQUAL "diff_same")
  make_checkpoint(${good} 1)
  # A second later: another `created`, which is shown but does not count.
  execute_process(COMMAND ${CMAKE_COMMAND} -E sleep 1.1)
  make_checkpoint(${dir}/again.h5 1)
  inspect(0 ARGS --diff ${good} ${good} MATCH "/params/keys +\\[4, 16, 8\\] +0\\.000e\\+00 +0\\.000e\\+00 +0/512 +identical\n"
          "attributes: model, config, dtype, format and step equal\n" "IDENTICAL: 3 datasets compared\n")
  inspect(0 ARGS --diff ${good} ${dir}/again.h5 MATCH "\n +created: [-0-9T:]+Z \\| [-0-9T:]+Z \\(not counted\\)\n"
          "IDENTICAL: 3 datasets compared\n")
  inspect(0 ARGS --json --diff ${good} ${dir}/again.h5)
  expect_json("${stdout}" ON identical)
elseif(CASE STREQUAL "diff_seeds")
  make_checkpoint(${good} 1)
  make_checkpoint(${dir}/other.h5 2)
  inspect(1 ARGS --diff ${good} ${dir}/other.h5 MATCH
          "/params/keys +\\[4, 16, 8\\] +[1-9]\\.[0-9]+e[-+][0-9]+ +[1-9]\\.[0-9]+e[-+][0-9]+ +[0-9]+/512 +DIFFERENT\n"
          "DIFFERENT: 3 of 3 datasets differ\n")
  inspect(1 ARGS --json --diff ${good} ${dir}/other.h5)
  expect_json("${stdout}" OFF identical)
  expect_json("${stdout}" /params/keys datasets 1 path)
  expect_json("${stdout}" different datasets 1 status)
  # Another config: the attribute is reported, the shapes differ.
  maker(sigma_moe "{\"dmodel\": 16, \"n_experts\": 4, \"expert_size\": 4, \"k\": 2}" 1 ${dir}/narrow.h5)
  inspect(1 ARGS --diff ${good} ${dir}/narrow.h5 MATCH "attributes that differ \\(A \\| B\\):\n +config: [^\n]*\"expert_size\":8[^\n]* \\| [^\n]*\"expert_size\":4"
          "/params/keys +\\[4, 16, 8\\] \\| \\[4, 16, 4\\] .*SHAPE DIFFERS\n" "DIFFERENT: 3 of 3 datasets differ, and 1 attributes\n")
elseif(CASE STREQUAL "h5ls")
  find_program(H5LS h5ls)
  if(NOT H5LS)
    message("SKIP: h5ls not found")
    return()
  endif()
  make_checkpoint(${good} 1 --with-optimizer)
  execute_process(COMMAND ${H5LS} -r ${good} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("$ h5ls -r ${good} -> ${rc}\n${out}")
  foreach(regex "/params +Group" "/params/keys +Dataset {4, 16, 8}" "/params/values +Dataset {4, 8, 16}"
          "/params/expert_sel +Dataset {4, 16}" "/optimizer/exp_avg/keys +Dataset {4, 16, 8}" "/rng/state +Dataset {2}")
    if(NOT rc EQUAL 0 OR NOT out MATCHES "${regex}")
      message(FATAL_ERROR "h5ls -r: the output does not match '${regex}'")
    endif()
  endforeach()
elseif(CASE STREQUAL "help")
  inspect(0 ARGS --help MATCH "^usage: kmoe-inspect \\[--json\\] \\[--verify\\] CHECKPOINT.h5\n" "--diff A.h5 B.h5")
elseif(CASE STREQUAL "unknown_option")
  inspect(2 ARGS --bogus MATCH "kmoe-inspect: unknown option '--bogus'\n" "usage: kmoe-inspect")
  inspect(2 ARGS MATCH "kmoe-inspect: no checkpoint given\n")
  inspect(2 ARGS --diff ${dir}/a.h5 MATCH "kmoe-inspect: --diff needs two checkpoints\n")
else()
  message(FATAL_ERROR "unknown CASE '${CASE}'")
endif()
