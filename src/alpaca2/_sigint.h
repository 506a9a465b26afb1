/* Ctrl+C during a long llama_decode: the decode runs without the GIL, so Python's own handler
 * only sets a flag that nobody reads until the call returns.  While a decode runs on the main
 * thread we put a tiny handler in front of Python's: it raises our flag (read by the abort
 * callback between graph nodes) and then calls Python's handler so KeyboardInterrupt follows. */
#ifndef ALPACA2_SIGINT_H
#define ALPACA2_SIGINT_H
#include <signal.h>
#include <string.h>

static volatile sig_atomic_t alpaca2_sigint_flag = 0;
static struct sigaction alpaca2_prev_sigint;

static void alpaca2_on_sigint(int sig) {
    alpaca2_sigint_flag = 1;
    if (alpaca2_prev_sigint.sa_flags & SA_SIGINFO) {
        return; /* not Python's handler: we never install over one of those */
    }
    if (alpaca2_prev_sigint.sa_handler != SIG_DFL && alpaca2_prev_sigint.sa_handler != SIG_IGN) {
        alpaca2_prev_sigint.sa_handler(sig);
    }
}

/* Returns 1 when installed (restore later), 0 when left alone (default or ignored disposition). */
static int alpaca2_sigint_install(void) {
    struct sigaction cur, sa;
    if (sigaction(SIGINT, NULL, &cur) != 0) return 0;
    if ((cur.sa_flags & SA_SIGINFO) || cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN) return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = alpaca2_on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_ONSTACK;
    alpaca2_prev_sigint = cur;
    alpaca2_sigint_flag = 0;
    return sigaction(SIGINT, &sa, NULL) == 0;
}

static void alpaca2_sigint_restore(void) {
    sigaction(SIGINT, &alpaca2_prev_sigint, NULL);
}

static int alpaca2_sigint_pending(void) { return alpaca2_sigint_flag != 0; }
static void alpaca2_sigint_clear(void) { alpaca2_sigint_flag = 0; }
#endif
