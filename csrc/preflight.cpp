// pmtp-preflight: llama.cpp's own loader and context set-up, run dry in a process of its
// own, so that a model file that would abort the process (a failed GGML_ASSERT, an
// uncaught C++ exception, a division by zero) kills this process instead of the caller's.
//
// Usage: pmtp-preflight MODEL LOAD_MTP COMPUTE REPACK [CONTEXT...]
//   CONTEXT = n_ctx,n_batch,n_ubatch,n_seq_max,n_rs_seq,embeddings,flash_attn(-1|0|1),
//             kv_unified,mtp; an MTP context pairs with the last non-MTP one before it.
//
// The model is read with no_alloc (metadata and tensor shapes, no weight is read: the same
// dry run as upstream's parameter fitting) on the CPU only; each context then reserves its
// graphs without allocating them. The vocabulary is exercised on its special tokens.
// With COMPUTE 1 (2) the file is then loaded for real on the CPU (always mapped, so the
// weights come from the page cache, never a private copy) and computed once: a
// two-token decode (2: instead a prefill and a two-token draft through the shim). ggml
// checks some tensor types only when a kernel runs (a norm weight stored as f16 aborts in
// the CPU's binary ops), so only a computation finds those.
//
// Protocol: stdout gets "cpu VARIANT" (the CPU kernels in use, as system_info() names
// them), then "stage NAME" before each step, flushed, so the caller knows where a crash
// happened; stderr gets llama.cpp's warnings and errors and, on a failed assert,
// ggml's message. Exit status: 0 sound; 10, 11, 12 llama.cpp refused cleanly to load, to
// create a context, to compute (clear of 1-3: abort() exits 3 on Windows); 64 bad usage.
// Death by a signal is what the caller turns into an error.

#include "llama.h"
#include "pyllama_mtp.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if !defined(_WIN32)
#include <sys/resource.h>
#endif

namespace {

constexpr int exit_load_failed = 10;
constexpr int exit_context_failed = 11;
constexpr int exit_compute_failed = 12;

void set_env(const char * name, const char * value) {
#if defined(_WIN32)
    _putenv_s(name, value);
#else
    setenv(name, value, 1);
#endif
}

void stage(const std::string & name) {
    std::fprintf(stdout, "stage %s\n", name.c_str());
    std::fflush(stdout);
}

void log_errors(ggml_log_level level, const char * text, void * /*user_data*/) {
    static bool keep = false;  // a CONT line belongs to the line before it
    if (level != GGML_LOG_LEVEL_CONT) {
        keep = level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR;
    }
    if (keep) {
        std::fputs(text, stderr);
    }
}

void report_abort(const char * message) {
    std::fprintf(stderr, "abort: %s\n", message);
    std::fflush(stderr);
}

struct context_spec {
    llama_context_params params;
    bool mtp = false;
};

bool parse_context(const char * text, context_spec & spec) {
    long v[9];
    char tail = 0;
    if (std::sscanf(text, "%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld,%ld%c", &v[0], &v[1], &v[2], &v[3], &v[4],
                    &v[5], &v[6], &v[7], &v[8], &tail) != 9) {
        return false;
    }
    spec.params = llama_context_default_params();
    spec.params.n_ctx = (uint32_t) v[0];
    spec.params.n_batch = (uint32_t) v[1];
    spec.params.n_ubatch = (uint32_t) v[2];
    spec.params.n_seq_max = (uint32_t) v[3];
    spec.params.n_rs_seq = (uint32_t) v[4];
    spec.params.embeddings = v[5] != 0;
    spec.params.flash_attn_type = v[6] < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                                : v[6] ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    spec.params.kv_unified = v[7] != 0;
    spec.mtp = v[8] != 0;
    spec.params.n_threads = 1;
    spec.params.n_threads_batch = 1;
    spec.params.no_perf = true;
    if (spec.mtp) {
        spec.params.ctx_type = LLAMA_CONTEXT_TYPE_MTP;
    }
    return true;
}

void exercise_vocab(const llama_model * model) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const char text[] = "Hello, world! 123";
    std::vector<llama_token> tokens(64);
    const int32_t n = llama_tokenize(vocab, text, (int32_t) std::strlen(text), tokens.data(),
                                     (int32_t) tokens.size(), true, true);
    char piece[256];
    for (int32_t i = 0; i < n; i++) {
        llama_token_to_piece(vocab, tokens[i], piece, sizeof(piece), 0, true);
    }
    for (llama_token special : {llama_vocab_bos(vocab), llama_vocab_eos(vocab), llama_vocab_eot(vocab),
                                llama_vocab_nl(vocab)}) {
        if (special >= 0) {
            llama_token_to_piece(vocab, special, piece, sizeof(piece), 0, true);
            llama_vocab_is_eog(vocab, special);
        }
    }
}

// The real thing, once, on the CPU: returns an exit status (0 when it ran).
int compute_once(const char * path, const llama_model_params & dry, bool mtp) {
    llama_model_params params = dry;
    params.no_alloc = false;
    // Always mapped: a read into private memory would cost the child the model's size.
    params.load_mode = LLAMA_LOAD_MODE_MMAP;
    llama_model * model = llama_model_load_from_file(path, params);
    if (model == nullptr) {
        return exit_load_failed;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_token> tokens;
    for (llama_token t : {llama_vocab_bos(vocab), llama_vocab_eos(vocab), (llama_token) 0}) {
        if (t >= 0 && t < n_vocab) {
            tokens.push_back(t);
        }
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 64;
    cparams.n_batch = cparams.n_ubatch = 16;
    cparams.n_rs_seq = 4;  // rollback snapshots for a speculative step on recurrent memory
    cparams.n_threads = cparams.n_threads_batch = (int32_t) std::max(1u, std::min(4u, std::thread::hardware_concurrency()));
    cparams.no_perf = true;
    int status = exit_context_failed;
    llama_context * target = llama_init_from_model(model, cparams);
    llama_context * draft = nullptr;
    if (target != nullptr && !tokens.empty()) {
        if (!mtp || llama_model_n_layer_nextn(model) <= 0) {
            llama_batch batch = llama_batch_get_one(tokens.data(), (int32_t) tokens.size());
            status = llama_decode(target, batch) == 0 ? 0 : exit_compute_failed;
        } else {
            llama_context_params dparams = cparams;
            dparams.ctx_type = LLAMA_CONTEXT_TYPE_MTP;
            dparams.ctx_other = target;
            draft = llama_init_from_model(model, dparams);
            int32_t spec_status = PMTP_ERR_ARGUMENT;
            pmtp_spec * spec = draft ? pmtp_spec_new(target, draft, 1, 2, &spec_status) : nullptr;
            if (spec != nullptr) {
                // The prefill runs the trunk and the drafter's catch-up, the draft the MTP
                // head twice: every kernel of a step, with a single pass over the trunk's
                // weights (a verify would be a second one).
                const int32_t n_draft[1] = {2};
                const bool ran = pmtp_spec_prefill(spec, 0, tokens.data(), (int32_t) tokens.size()) == PMTP_OK &&
                                 pmtp_spec_draft(spec, n_draft, 0.0f) == PMTP_OK;
                status = ran ? 0 : exit_compute_failed;
                pmtp_spec_free(spec);
            }
        }
    }
    if (draft != nullptr) {
        llama_free(draft);
    }
    if (target != nullptr) {
        llama_free(target);
    }
    llama_model_free(model);
    return status;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s MODEL LOAD_MTP COMPUTE REPACK [n_ctx,n_batch,n_ubatch,n_seq_max,n_rs_seq,"
                             "embeddings,flash_attn,kv_unified,mtp ...]\n", argv[0]);
        return 64;
    }
    const bool load_mtp = std::atoi(argv[2]) != 0;
    const int compute = std::atoi(argv[3]);  // 0 none, 1 a decode, 2 a speculative step
    const bool repack = std::atoi(argv[4]) != 0;  // weights into the CPU's extra buffer types
    std::vector<context_spec> contexts(argc - 5);
    for (int i = 5; i < argc; i++) {
        if (!parse_context(argv[i], contexts[i - 5])) {
            std::fprintf(stderr, "bad context specification: %s\n", argv[i]);
            return 64;
        }
    }
#if !defined(_WIN32)
    // A death here is expected and reported by the caller: no core file in its directory.
    const rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
#endif
    // ggml would otherwise attach a debugger to print a backtrace before it aborts.
    set_env("GGML_NO_BACKTRACE", "1");
    // Everything here runs on the CPU: spare the GPU backends their device set-up.
    set_env("GGML_VK_VISIBLE_DEVICES", "");
    set_env("CUDA_VISIBLE_DEVICES", "");
    set_env("HIP_VISIBLE_DEVICES", "");
    ggml_set_abort_callback(report_abort);
    llama_log_set(log_errors, nullptr);
    if (pmtp_backends_load() != PMTP_OK) {
        std::fprintf(stderr, "no CPU backend could be loaded beside the library\n");
        return exit_load_failed;
    }
    llama_backend_init();
    std::fprintf(stdout, "cpu %s\n", pmtp_cpu_variant());  // the CPU kernels this run uses

    stage("load");
    llama_model_params mparams = llama_model_default_params();
    ggml_backend_dev_t no_devices[] = {nullptr};
    mparams.devices = no_devices;  // the CPU only: nothing here depends on the device
    mparams.n_gpu_layers = 0;
    mparams.no_alloc = true;
    mparams.load_mode = LLAMA_LOAD_MODE_NONE;
    mparams.load_mtp = load_mtp;
    mparams.use_extra_bufts = repack;
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (model == nullptr) {
        return exit_load_failed;
    }

    stage("vocabulary");
    exercise_vocab(model);

    std::vector<llama_context *> made;
    llama_context * target = nullptr;
    int status = 0;
    for (size_t i = 0; i < contexts.size(); i++) {
        stage("context " + std::to_string(i));
        context_spec & spec = contexts[i];
        if (spec.mtp) {
            spec.params.ctx_other = target;
        }
        llama_context * ctx = llama_init_from_model(model, spec.params);
        if (ctx == nullptr) {
            status = exit_context_failed;
            break;
        }
        made.push_back(ctx);
        if (!spec.mtp) {
            target = ctx;
        }
    }
    stage("free");
    for (auto it = made.rbegin(); it != made.rend(); ++it) {
        llama_free(*it);
    }
    llama_model_free(model);
    if (status == 0 && compute) {
        stage("compute");
        status = compute_once(argv[1], mparams, compute == 2);
    }
    llama_backend_free();
    stage(status == 0 ? "sound" : "failed");
    return status;
}
