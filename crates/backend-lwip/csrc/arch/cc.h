/* tungate's lwIP port header for Linux/Android (GCC or Clang). */
#ifndef TUNGATE_ARCH_CC_H
#define TUNGATE_ARCH_CC_H

#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <errno.h>

/* Byte order from the compiler; lwIP's own LITTLE_ENDIAN/BIG_ENDIAN values are 1234/4321. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BYTE_ORDER 4321
#else
#define BYTE_ORDER 1234
#endif

/* Never used (no active opens, no UDP), defined so lwIP picks random local ports if it
 * ever needed one. */
#define LWIP_RAND() ((u32_t)random())

/* lwIP's internal invariants: a failure is a bug, reported and fatal, like a Rust panic
 * that cannot unwind through C. */
#define LWIP_PLATFORM_DIAG(x) do { printf x; } while (0)
#define LWIP_PLATFORM_ASSERT(x) do { fprintf(stderr, "lwIP assertion failed: %s at %s:%d\n", x, __FILE__, __LINE__); fflush(NULL); abort(); } while (0)

#endif /* TUNGATE_ARCH_CC_H */
