/* A module with thread-local storage, loaded by dlopen: its TLS block is allocated on first use
   (glibc's dynamic TLS), as Open MPI's plugins' are. See leak_check_with_dynamic_tls.c. */
__thread char dynamic_tls_block[100];

char* dynamic_tls_block_address(void) {
  dynamic_tls_block[0] = 1;
  return dynamic_tls_block;
}
