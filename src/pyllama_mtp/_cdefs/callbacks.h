/* Python functions that C calls back (cffi "extern Python", see pyllama_mtp/_ffi.py). */

extern "Python" void pmtp_py_log(enum ggml_log_level level, const char * text, void * user_data);
extern "Python" bool pmtp_py_progress(float progress, void * user_data);
