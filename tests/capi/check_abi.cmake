# abidiff of the built libkmoe.so against the committed baseline (capi/abi/libkmoe.abi, made by
# `cmake/kmoe abi-baseline`): any change to an existing function or type of kmoe.h, or a removed
# function, fails; added functions pass (--no-added-syms).
# -DLIBRARY=... -DBASELINE=... -DHEADERS=capi/include -DABIDIFF=abidiff
execute_process(COMMAND ${ABIDIFF} --headers-dir2 ${HEADERS} --drop-private-types --exported-interfaces-only
                        --no-added-syms ${BASELINE} ${LIBRARY}
                OUTPUT_VARIABLE report ERROR_VARIABLE errors RESULT_VARIABLE rc)
message("${report}${errors}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "abidiff exit ${rc}: libkmoe.so is not ABI-compatible with ${BASELINE}; "
                      "for a deliberate change see README \"ABI stability\"")
endif()
message(STATUS "libkmoe.so is ABI-compatible with ${BASELINE}")
