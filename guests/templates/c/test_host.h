/* A host in memory standing in for raft-host's imports, so `make test` runs
 * the state machine natively with cc: no cluster, no component build. It
 * keeps a member's rules: an apply's writes are kept only if it returns
 * true, and a query cannot write. */
#ifndef TEST_HOST_H
#define TEST_HOST_H

#include <stdbool.h>
#include <stdint.h>

/* Applies `command` at the next log index; its writes are kept only if the
 * call returns true. `answer` (NUL-terminated, malloc'd) is the reply or the
 * error; free it. */
bool test_apply(const char *command, char **answer);
/* Answers `request` read-only. */
bool test_query(const char *request, char **answer);
/* The committed value of `key` (NUL-terminated, malloc'd), or NULL. */
char *test_get(const char *key);
/* Forgets every key and starts the log again at index 1. */
void test_reset(void);

#endif
