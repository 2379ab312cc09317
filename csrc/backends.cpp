// Backends: loading the modules of a portable build, naming the CPU variant in use, and
// registering RPC servers.

#include "pyllama_mtp.h"

#include "ggml-backend.h"

#include <exception>
#include <string>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

namespace {

#if !defined(_WIN32)
// The file a function was loaded from ("" when the loader cannot tell).
std::string file_of(const void * address) {
    Dl_info info{};
    if (address == nullptr || dladdr(address, &info) == 0 || info.dli_fname == nullptr) {
        return {};
    }
    return info.dli_fname;
}

std::string folder_of(const std::string & path) {
    const auto slash = path.rfind('/');
    return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}
#endif

ggml_backend_reg_t cpu_reg() {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return cpu == nullptr ? nullptr : ggml_backend_dev_backend_reg(cpu);
}

}  // namespace

extern "C" {

const char * pmtp_backend_loading(void) {
#if defined(GGML_BACKEND_DL)
    return "dynamic";
#else
    return "linked";
#endif
}

int32_t pmtp_backends_load(void) {
#if defined(GGML_BACKEND_DL) && !defined(_WIN32)
    try {
        if (cpu_reg() != nullptr) {
            return PMTP_OK;  // loaded already (a second call, or GGML_BACKEND_PATH)
        }
        // The modules are installed beside this library: its own folder, not the
        // executable's (Python's) nor the current directory, as upstream's default would.
        const std::string here = folder_of(file_of(reinterpret_cast<const void *>(&pmtp_backends_load)));
        ggml_backend_load_all_from_path(here.c_str());
        return cpu_reg() == nullptr ? PMTP_ERR_INTERNAL : PMTP_OK;
    } catch (const std::exception &) {
        return PMTP_ERR_INTERNAL;
    }
#else
    return PMTP_OK;
#endif
}

const char * pmtp_cpu_variant(void) {
    ggml_backend_reg_t reg = cpu_reg();
    if (reg == nullptr) {
        return "none";
    }
#if defined(GGML_BACKEND_DL) && !defined(_WIN32)
    // The variant is the module the registry came from: libggml-cpu-<variant>.so.
    static thread_local std::string variant;
    std::string file = file_of(ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    file = file.substr(file.rfind('/') + 1);
    const std::string prefix = "libggml-cpu-";
    variant = file.rfind(prefix, 0) == 0 ? file.substr(prefix.size(), file.find('.') - prefix.size()) : "default";
    return variant.c_str();
#elif defined(PYLLAMA_MTP_CPU_NATIVE)
    return "native";
#else
    return "fixed";
#endif
}

int32_t pmtp_rpc_add_server(const char * endpoint) {
    if (endpoint == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    // Looked up by name, as llama.cpp's own tools do, so a build without RPC still links.
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    if (rpc == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    using add_server_fn = ggml_backend_reg_t (*)(const char *);
    auto add_server = reinterpret_cast<add_server_fn>(ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server"));
    if (add_server == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    try {
        ggml_backend_reg_t server = add_server(endpoint);
        if (server == nullptr) {
            return PMTP_ERR_INTERNAL;
        }
        ggml_backend_register(server);
        return PMTP_OK;
    } catch (const std::exception &) {
        return PMTP_ERR_INTERNAL;
    }
}

}  // extern "C"
