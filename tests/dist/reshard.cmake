# Dist.reshard: a checkpoint of each model (σ-MoE, ST-MoE, the hierarchical MoE, Soft MoE lite;
# 6 experts each) written at W = 4 loads at W = 1, 3, 6 and 20 (more ranks than experts:
# hidden-unit shards) with the same outputs, and re-saved there is the same checkpoint
# (kmoe-inspect --diff: identical).
#   cmake -DMPIEXEC=... -DTESTS=<kmoe_dist_tests> -DINSPECT=<kmoe-inspect> -DSCRATCH=<folder> -P reshard.cmake
foreach(var MPIEXEC TESTS INSPECT SCRATCH)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "reshard.cmake needs -D${var}=...")
  endif()
endforeach()
file(MAKE_DIRECTORY ${SCRATCH})
function(run ranks filter)
  execute_process(COMMAND ${MPIEXEC} --allow-run-as-root --oversubscribe -n ${ranks} ${TESTS}
                          --gtest_filter=DistCheckpoint.${filter}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "$ENV{KMOE_RESHARD_MODEL} ${filter} at W = ${ranks} failed (${rc}):\n${out}")
  endif()
endfunction()
foreach(model sigma_moe st_moe hier_moe_v0014 soft_moe_lite)
  set(ENV{KMOE_RESHARD_MODEL} ${model})
  set(written ${SCRATCH}/${model}_written_at_4.h5)
  set(ENV{KMOE_RESHARD_IN} ${written})
  run(4 WriteForResharding)
  foreach(ranks 1 3 6 20)
    set(resaved ${SCRATCH}/${model}_resaved_at_${ranks}.h5)
    set(ENV{KMOE_RESHARD_OUT} ${resaved})
    run(${ranks} ReshardAndResave)
    execute_process(COMMAND ${INSPECT} --diff ${written} ${resaved} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                    ERROR_VARIABLE out)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "${model} re-saved at W = ${ranks} differs from the checkpoint written at W = 4:\n${out}")
    endif()
    message("${model} W = ${ranks}: same outputs, re-saved checkpoint identical")
  endforeach()
endforeach()
