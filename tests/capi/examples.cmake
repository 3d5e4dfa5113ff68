# Installs kmoe (component kmoe) into PREFIX and builds capi/examples against the installed
# package as a separate CMake project, as a user would; also builds the C example with
# pkg-config's flags. -DBUILD_DIR -DPREFIX -DSOURCE -DEXAMPLES_BUILD -DGENERATOR
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "${command} failed (${rc}):\n${out}\n${err}")
  endif()
endfunction()

file(REMOVE_RECURSE ${PREFIX} ${EXAMPLES_BUILD})
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --component kmoe --prefix ${PREFIX})
foreach(installed include/kmoe.h lib/libkmoe.so lib/cmake/kmoe/kmoeConfig.cmake lib/pkgconfig/kmoe.pc)
  if(NOT EXISTS ${PREFIX}/${installed})
    message(FATAL_ERROR "the install lacks ${installed}")
  endif()
endforeach()
run(${CMAKE_COMMAND} -S ${SOURCE} -B ${EXAMPLES_BUILD} -G ${GENERATOR} -DCMAKE_PREFIX_PATH=${PREFIX}
    -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build ${EXAMPLES_BUILD})
# pkg-config: the C example from kmoe.pc's flags (mpicc for MPI's).
set(ENV{PKG_CONFIG_PATH} ${PREFIX}/lib/pkgconfig)
execute_process(COMMAND pkg-config --cflags --libs kmoe OUTPUT_VARIABLE flags RESULT_VARIABLE rc
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config --cflags --libs kmoe failed")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
run(mpicc ${SOURCE}/sigma_moe.c ${flags} -Wl,-rpath,${PREFIX}/lib -lm -o ${EXAMPLES_BUILD}/sigma_moe_pkgconfig)
message(STATUS "installed kmoe into ${PREFIX}; examples built in ${EXAMPLES_BUILD}")
