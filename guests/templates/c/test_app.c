/* Tests of app.c on this machine, with `make test`: the state machine runs
 * natively against the host in memory of test_host.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_host.h"

static int failures;

static void expect(bool ok, const char *answer, bool expected_ok, const char *expected, const char *what) {
    if (ok != expected_ok || (expected != NULL && strcmp(answer, expected) != 0)) {
        fprintf(stderr, "FAIL %s: got %s \"%s\", expected %s \"%s\"\n", what, ok ? "ok" : "error", answer,
                expected_ok ? "ok" : "error", expected ? expected : "(any)");
        failures++;
    }
}

static void check_apply(const char *command, bool expected_ok, const char *expected) {
    char *answer;
    bool ok = test_apply(command, &answer);
    expect(ok, answer, expected_ok, expected, command);
    free(answer);
}

static void check_query(const char *request, bool expected_ok, const char *expected) {
    char *answer;
    bool ok = test_query(request, &answer);
    expect(ok, answer, expected_ok, expected, request);
    free(answer);
}

static void adds_up(void) {
    check_apply("{\"op\":\"add\",\"key\":\"a\",\"by\":2}", true, "2");
    check_apply("{\"op\":\"add\",\"key\":\"a\",\"by\":-5}", true, "-3");
    check_query("{\"op\":\"get\",\"key\":\"a\"}", true, "-3");
    check_query("{\"op\":\"get\",\"key\":\"never\"}", true, "0");
}

static void a_refused_command_changes_nothing(void) {
    check_apply("{\"op\":\"add\",\"key\":\"big\",\"by\":9223372036854775807}", true, "9223372036854775807");
    check_apply("{\"op\":\"add\",\"key\":\"big\",\"by\":1}", false, NULL);
    check_query("{\"op\":\"get\",\"key\":\"big\"}", true, "9223372036854775807");
    check_apply("not json", false, NULL);
    check_apply("{\"op\":\"add\",\"key\":\"a\"}", false, NULL);
    check_apply("{\"op\":\"add\",\"key\":\"a\",\"by\":1.5}", false, NULL);
    check_apply("{\"op\":\"add\",\"key\":\"a\",\"by\":1,\"extra\":true}", false, NULL);
    check_query("{\"op\":\"add\",\"key\":\"a\",\"by\":1}", false, NULL);
}

int main(void) {
    adds_up();
    test_reset();
    a_refused_command_changes_nothing();
    if (failures) {
        fprintf(stderr, "%d failed\n", failures);
        return 1;
    }
    printf("all tests passed\n");
    return 0;
}
