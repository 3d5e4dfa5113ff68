# Converts a .safetensors file to a kmoe checkpoint with kmoe-convert (its __metadata__ names the
# layer and config unless ARGS give them), then runs kmoe-parity on the fixture with the
# checkpoint's parameters in place of the dump's /params: both must exit 0.
#   -DCONVERT=... -DPARITY=... -DSAFETENSORS=... -DFIXTURE=... -DCHECKPOINT=... [-DARGS=a|b|c]
string(REPLACE "|" ";" extra "${ARGS}")
file(REMOVE ${CHECKPOINT})
execute_process(COMMAND ${CONVERT} ${SAFETENSORS} ${extra} -o ${CHECKPOINT} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "kmoe-convert exited with ${rc}")
endif()
execute_process(COMMAND ${PARITY} ${FIXTURE} --params ${CHECKPOINT} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "kmoe-parity --params exited with ${rc}")
endif()
