// Chat for the binding: llama.cpp's own chat layer (common/chat.h: Jinja templates,
// per-family output parsers; common/json-schema-to-grammar.h), with JSON crossing the C
// boundary. The request is read as llama-server reads an OpenAI chat request, so a
// prompt rendered here is the prompt the server would render.

#include "pyllama_mtp.h"
#include "internal.h"

#include "chat.h"                    // llama.cpp common/
#include "json-schema-to-grammar.h"  // llama.cpp common/
#include "json.h"                    // llama.cpp common/
#include "log.h"                     // llama.cpp common/

#include <memory>
#include <string>

struct pmtp_chat_templates {
    common_chat_templates_ptr templates;
};

namespace {

using pmtp::guarded;

template <typename T>
T value_or(const common_json & object, const char * key, T fallback) {
    return object.is_object() && object.contains(key) && !object.at(key).is_null() ? object.at(key).get<T>()
                                                                                    : fallback;
}

// Run body, which fills `result`; hand the result or the error message to *out.
template <typename F>
int32_t json_call(char ** out, F && body) {
    if (out == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    *out = nullptr;
    std::string result;
    const int32_t status = guarded([&] { body(result); return (int32_t) PMTP_OK; }, out, PMTP_ERR_ARGUMENT);
    if (status == PMTP_OK) {
        *out = pmtp::copy_string(result);
        return *out != nullptr ? PMTP_OK : PMTP_ERR_ALLOC;
    }
    return status;
}

// The fields of an OpenAI chat request that the template sees, as llama-server maps them.
common_chat_templates_inputs read_inputs(const common_chat_templates * templates, const common_json & request) {
    if (!request.is_object() || !request.contains("messages") || !request.at("messages").is_array()) {
        throw std::invalid_argument("the request needs 'messages', an array of messages");
    }
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(request.at("messages"));
    if (request.contains("tools") && !request.at("tools").is_null()) {
        inputs.tools = common_chat_tools_parse_oaicompat(request.at("tools"));
    }
    inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(value_or<std::string>(request, "tool_choice", "auto"));
    if (request.contains("json_schema") && !request.at("json_schema").is_null()) {
        inputs.json_schema = request.at("json_schema").dump();
    }
    inputs.grammar = value_or<std::string>(request, "grammar", "");
    if (!inputs.json_schema.empty() && !inputs.grammar.empty()) {
        throw std::invalid_argument("give a JSON schema or a grammar, not both");
    }
    if (!inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE && !inputs.grammar.empty()) {
        throw std::invalid_argument("a grammar cannot be combined with tools");
    }
    inputs.use_jinja = true;
    const auto caps = common_chat_templates_get_caps(templates);
    const auto parallel = caps.find("supports_parallel_tool_calls");
    inputs.parallel_tool_calls = value_or<bool>(request, "parallel_tool_calls",
                                                parallel != caps.end() && parallel->second);
    inputs.add_generation_prompt = value_or<bool>(request, "add_generation_prompt", true);
    inputs.reasoning_format = common_reasoning_format_from_name(value_or<std::string>(request, "reasoning_format", "deepseek"));
    // llama-server's default: thinking on where the template can turn it off.
    inputs.enable_thinking = common_chat_templates_support_enable_thinking(templates);
    if (request.contains("chat_template_kwargs") && request.at("chat_template_kwargs").is_object()) {
        for (const auto & [key, value] : request.at("chat_template_kwargs").items()) {
            inputs.chat_template_kwargs[key] = value.dump();
        }
    }
    // llama.cpp's argument parser gives llama-server this default (templates that can keep
    // past turns' reasoning, e.g. DeepSeek V4, then keep it).
    inputs.chat_template_kwargs.emplace("preserve_reasoning", "true");
    const auto kwarg = inputs.chat_template_kwargs.find("enable_thinking");
    if (kwarg != inputs.chat_template_kwargs.end()) {
        if (kwarg->second != "true" && kwarg->second != "false") {
            throw std::invalid_argument("enable_thinking must be true or false");
        }
        inputs.enable_thinking = kwarg->second == "true";
    }
    if (request.contains("enable_thinking") && !request.at("enable_thinking").is_null()) {
        inputs.enable_thinking = request.at("enable_thinking").get<bool>();
        inputs.chat_template_kwargs["enable_thinking"] = inputs.enable_thinking ? "true" : "false";
    }
    return inputs;
}

}  // namespace

extern "C" {

int32_t pmtp_chat_templates_new(const llama_model * model, const char * template_source,
                                pmtp_chat_templates ** templates, char ** error) {
    if (templates == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    *templates = nullptr;
    const std::string source = template_source != nullptr ? template_source : "";
    if (model == nullptr && source.empty()) {
        return pmtp::fail(error, PMTP_ERR_ARGUMENT, "need a model or a template source");
    }
    return guarded([&] {
        auto made = std::make_unique<pmtp_chat_templates>();
        made->templates = common_chat_templates_init(model, source);
        if (!made->templates) {
            return pmtp::fail(error, PMTP_ERR_ARGUMENT, "llama.cpp could not load the chat template");
        }
        *templates = made.release();
        return (int32_t) PMTP_OK;
    }, error, PMTP_ERR_ARGUMENT);
}

void pmtp_chat_templates_free(pmtp_chat_templates * templates) {
    delete templates;
}

int32_t pmtp_chat_templates_info(const pmtp_chat_templates * templates, char ** out) {
    if (templates == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return json_call(out, [&](std::string & result) {
        const common_chat_templates * t = templates->templates.get();
        common_json info = common_json::object();
        info["source"] = common_chat_templates_source(t);
        const std::string tool_use = common_chat_templates_source(t, "tool_use");
        info["tool_use_source"] = tool_use.empty() ? common_json() : common_json(tool_use);
        info["supports_thinking"] = common_chat_templates_support_enable_thinking(t);
        common_json caps = common_json::object();
        for (const auto & [name, supported] : common_chat_templates_get_caps(t)) {
            caps[name] = supported;
        }
        info["caps"] = caps;
        result = info.dump();
    });
}

int32_t pmtp_chat_apply(const pmtp_chat_templates * templates, const char * request_json, char ** out) {
    if (templates == nullptr || request_json == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return json_call(out, [&](std::string & result) {
        const common_json request = common_json::parse(request_json);
        const common_chat_templates_inputs inputs = read_inputs(templates->templates.get(), request);
        const common_chat_params params = common_chat_templates_apply(templates->templates.get(), inputs);
        common_json rendered = common_json::object();
        rendered["prompt"] = params.prompt;
        rendered["format"] = (int) params.format;
        rendered["format_name"] = common_chat_format_name(params.format);
        rendered["grammar"] = params.grammar;
        // A user's grammar is taken as is; the template's own grammars (schema output, tool
        // calls) start after the generation prompt, which llama.cpp feeds them first.
        rendered["grammar_type"] = inputs.grammar.empty() ? "output_format" : "user";
        rendered["grammar_lazy"] = params.grammar_lazy;
        common_json triggers = common_json::array();
        for (const auto & trigger : params.grammar_triggers) {
            triggers.push_back(common_json::object({{"type", (int) trigger.type},
                                                    {"value", trigger.value},
                                                    {"token", (int) trigger.token}}));
        }
        rendered["grammar_triggers"] = triggers;
        rendered["preserved_tokens"] = params.preserved_tokens;
        rendered["additional_stops"] = params.additional_stops;
        rendered["generation_prompt"] = params.generation_prompt;
        rendered["parser"] = params.parser;
        rendered["supports_thinking"] = params.supports_thinking;
        rendered["reasoning_format"] = common_reasoning_format_name(inputs.reasoning_format);
        rendered["parse_tool_calls"] = !inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
        result = rendered.dump();
    });
}

int32_t pmtp_chat_parse(const char * text, int32_t is_partial, const char * parser_json, char ** out) {
    if (text == nullptr || parser_json == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return json_call(out, [&](std::string & result) {
        const common_json state = common_json::parse(parser_json);
        common_chat_parser_params params;
        params.format = (common_chat_format) value_or<int>(state, "format", (int) COMMON_CHAT_FORMAT_CONTENT_ONLY);
        params.generation_prompt = value_or<std::string>(state, "generation_prompt", "");
        params.reasoning_format = common_reasoning_format_from_name(value_or<std::string>(state, "reasoning_format", "deepseek"));
        params.parse_tool_calls = value_or<bool>(state, "parse_tool_calls", true);
        const std::string parser = value_or<std::string>(state, "parser", "");
        if (!parser.empty()) {
            params.parser.load(parser);
        }
        const common_chat_msg msg = common_chat_parse(text, is_partial != 0, params);
        result = msg.to_json_oaicompat().dump();
    });
}

int32_t pmtp_json_schema_to_grammar(const char * schema_json, char ** out) {
    if (schema_json == nullptr) {
        return PMTP_ERR_ARGUMENT;
    }
    return json_call(out, [&](std::string & result) {
        result = json_schema_to_grammar(common_json::parse(schema_json));
    });
}

void pmtp_common_log_pause(void) {
    common_log_pause(common_log_main());
}

void pmtp_string_free(char * text) {
    std::free(text);
}

}  // extern "C"
