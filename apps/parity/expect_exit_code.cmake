# Parity.exit.*: runs kmoe-parity and fails unless it exits with the expected status and its
# output (stdout and stderr together) matches the expected regular expression.
#   cmake -DTOOL=<kmoe-parity> -DEXPECT_CODE=<0|1|2> -DEXPECT_OUTPUT=<regex> -DFILES=<a|b|...>
#         [-DMUTATOR=<kmoe-parity-mutate> -DSOURCE=<fixture> -DMUTATED=<copy> -DMUTATION=<action|args...>]
#         -P expect_exit_code.cmake
# With MUTATION, the mutator first writes a broken copy of SOURCE to MUTATED, which is checked
# before FILES.
if(NOT TOOL OR NOT DEFINED EXPECT_CODE)
  message(FATAL_ERROR "usage: see the header of expect_exit_code.cmake")
endif()

string(REPLACE "|" ";" files "${FILES}")
if(MUTATION)
  string(REPLACE "|" ";" mutation "${MUTATION}")
  execute_process(COMMAND "${MUTATOR}" "${SOURCE}" "${MUTATED}" ${mutation} RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "could not prepare ${MUTATED} (${rc}): ${err}")
  endif()
  list(INSERT files 0 "${MUTATED}")
endif()

# One variable for both streams keeps the lines in the order the tool wrote them.
execute_process(COMMAND "${TOOL}" ${files} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT code STREQUAL EXPECT_CODE)
  message(FATAL_ERROR "kmoe-parity exited with ${code}, expected ${EXPECT_CODE}")
endif()
if(DEFINED EXPECT_OUTPUT AND NOT out MATCHES "${EXPECT_OUTPUT}")
  message(FATAL_ERROR "kmoe-parity's output does not match: ${EXPECT_OUTPUT}")
endif()
