/* The asan flavour's options keep LeakSanitizer's exit check alive when a dynamic TLS block starts
   16 bytes into a page. Up to LLVM 16 / GCC 13 the runtime's __tls_get_addr interceptor takes such
   a block for one with a pre-glibc-2.25 header, reads a bogus range from the two words before it,
   and the check's tracer dies at exit ("Tracer caught signal 11": Dist.W8 failed CI so);
   intercept_tls_get_addr=0 (cmake/kmoe) avoids it. One child per count of filler allocations
   before the dlopen moves the block until it lands on that offset; every child must exit cleanly.
     leak_check_with_dynamic_tls PATH_OF_dynamic_tls_module.so */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

enum { max_fillers = 1024, filler_bytes = 100 };
static void* fillers[max_fillers]; /* reachable: not leaks */

/* In a child: fillers, then the module's TLS block; returns whether it starts 16 bytes into a page. */
static int place_block(const char* module, int filler_count) {
  for (int i = 0; i < filler_count; ++i) fillers[i] = malloc(filler_bytes);
  void* handle = dlopen(module, RTLD_NOW);
  if (handle == NULL) {
    fprintf(stderr, "dlopen %s: %s\n", module, dlerror());
    exit(2);
  }
  char* (*address)(void) = (char* (*)(void))dlsym(handle, "dynamic_tls_block_address");
  return (uintptr_t)address() % 4096 == 16;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s dynamic_tls_module.so\n", argv[0]);
    return 2;
  }
  for (int filler_count = 0; filler_count < max_fillers; ++filler_count) {
    int channel[2];
    if (pipe(channel) != 0) return perror("pipe"), 2;
    const pid_t child = fork();
    if (child < 0) return perror("fork"), 2;
    if (child == 0) {
      close(channel[0]);
      const char landed = (char)place_block(argv[1], filler_count);
      if (write(channel[1], &landed, 1) != 1) _exit(2);
      return 0; /* LeakSanitizer's check runs at this exit */
    }
    close(channel[1]);
    char landed = 0;
    if (read(channel[0], &landed, 1) != 1) landed = 0;
    close(channel[0]);
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "FAILED: the child with %d filler allocations (TLS block %s16 bytes into a page) exited %s %d\n",
              filler_count, landed ? "" : "not ", WIFEXITED(status) ? "with" : "on signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
      return 1;
    }
    if (landed) {
      printf("the child with %d filler allocations had its TLS block 16 bytes into a page and exited cleanly\n",
             filler_count);
      return 0;
    }
  }
  fprintf(stderr, "FAILED: no child's TLS block landed 16 bytes into a page; the case was not exercised\n");
  return 1;
}
