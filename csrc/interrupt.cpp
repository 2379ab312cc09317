// Stopping a running llama_decode: a cancel flag, a deadline, and Ctrl-C.
//
// llama.cpp polls a context's abort callback between graph nodes. Our callback reads a small
// struct that Python fills before each call, so the poll costs no Python and no GIL.
//
// Ctrl-C: while C runs, Python's own SIGINT handler only records the signal; the
// KeyboardInterrupt waits until the call returns, which for a long prompt may be minutes.
// During such calls our handler replaces Python's and only bumps a counter: the abort
// callback sees it, and the caller raises KeyboardInterrupt once the call returns. We do
// not chain to Python's handler: its pending KeyboardInterrupt would fire inside the next
// log callback that llama.cpp makes from C, where it is printed and lost.

#include "pyllama_mtp.h"

#include <chrono>
#include <csignal>
#include <mutex>

namespace {

uint64_t              g_sigint_count = 0;  // updated with atomics only
std::mutex            g_watch_mutex;
int                   g_watchers = 0;
bool                  g_installed = false;
struct sigaction      g_previous;

bool is_function(const struct sigaction & action) {
    if (action.sa_flags & SA_SIGINFO) {
        return action.sa_sigaction != nullptr;
    }
    return action.sa_handler != SIG_DFL && action.sa_handler != SIG_IGN;
}

void on_sigint(int) {
    __atomic_add_fetch(&g_sigint_count, 1, __ATOMIC_SEQ_CST);
}

}  // namespace

extern "C" {

int64_t pmtp_monotonic_us(void) {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool pmtp_abort_check(void * data) {
    auto * state = static_cast<pmtp_abort_state *>(data);
    if (state == nullptr || state->between_calls_only) {
        return false;
    }
    if (__atomic_load_n(&state->cancel, __ATOMIC_RELAXED) != 0) {
        state->reason = PMTP_ABORT_CANCEL;
        return true;
    }
    if (state->watch_sigint && __atomic_load_n(&g_sigint_count, __ATOMIC_RELAXED) != state->sigint_mark) {
        state->reason = PMTP_ABORT_SIGINT;
        return true;
    }
    if (state->deadline_us != 0 && pmtp_monotonic_us() >= state->deadline_us) {
        state->reason = PMTP_ABORT_TIMEOUT;
        return true;
    }
    return false;
}

uint64_t pmtp_sigint_watch_begin(void) {
    std::lock_guard<std::mutex> guard(g_watch_mutex);
    if (g_watchers++ == 0) {
        struct sigaction current;
        // Only chain in front of a real handler (Python's): with SIG_DFL or SIG_IGN the
        // process's behaviour on Ctrl-C is not ours to change.
        if (sigaction(SIGINT, nullptr, &current) == 0 && is_function(current)) {
            g_previous = current;
            struct sigaction ours = {};
            ours.sa_handler = on_sigint;
            ours.sa_flags = SA_ONSTACK | (current.sa_flags & SA_RESTART);
            sigemptyset(&ours.sa_mask);
            g_installed = sigaction(SIGINT, &ours, nullptr) == 0;
        }
    }
    return __atomic_load_n(&g_sigint_count, __ATOMIC_SEQ_CST);
}

void pmtp_sigint_watch_end(void) {
    std::lock_guard<std::mutex> guard(g_watch_mutex);
    if (g_watchers > 0 && --g_watchers == 0 && g_installed) {
        sigaction(SIGINT, &g_previous, nullptr);
        g_installed = false;
    }
}

uint64_t pmtp_sigint_count(void) {
    return __atomic_load_n(&g_sigint_count, __ATOMIC_SEQ_CST);
}

}  // extern "C"
