"""Constrained output with MTP: the grammar masks the target at verification, drafts stay
free. Greedy constrained MTP output is plain constrained output, token for token, and
JSON-schema answers parse and validate."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from helpers import EXACT, PROMPT
from pyllama_mtp import Grammar, InvalidArgumentError, LlamaError, Model, Sampler, SpeculativeDecoder, fixtures

pytestmark = pytest.mark.backend_independent(
    "the grammar masks logits in the CPU sampler whatever device computed them; "
    "those logits are test_backends' and test_speculative's")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
# Every byte but '!' and '~': the model's own choices mostly pass, so MTP drafts keep
# being accepted under the grammar (partial acceptance, not all or nothing).
MOST_BYTES = r'root ::= [^!~]+'
N_TOKENS = 120


def plain_constrained(model, grammar, n_tokens=N_TOKENS):
    with model.context(n_ctx=1024, **EXACT) as ctx, Sampler(0.0, grammar=grammar) as sampler:
        return list(ctx.generate(PROMPT, max_tokens=n_tokens, sampler=sampler))


def mtp_constrained(model, grammar, n_draft, n_tokens=N_TOKENS):
    with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=n_draft, grammar=grammar, **EXACT) as decoder:
        return list(decoder.generate(PROMPT, max_tokens=n_tokens)), decoder.stats


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["json_schema", "gbnf"])
def test_greedy_constrained_mtp_is_plain_constrained_decoding(model_path, arch, n_draft, kind):
    grammar = Grammar.from_json_schema(SCHEMA) if kind == "json_schema" else Grammar(MOST_BYTES)
    # JSON strings on the byte vocabulary can hold bytes that are no UTF-8 (see below):
    # the schema's string length is then checked on a word vocabulary.
    with Model.load(model_path(arch, text=fixtures.DEMO_TEXT) if kind == "json_schema" else model_path(arch)) \
            as model:
        n_tokens = 600 if kind == "json_schema" else N_TOKENS  # the document ends it (end of text)
        plain = plain_constrained(model, grammar, n_tokens)
        mtp, stats = mtp_constrained(model, grammar, n_draft, n_tokens)
        text = model.detokenize(plain)
    assert mtp == plain
    if kind == "json_schema":
        assert len(plain) < n_tokens
        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert len(plain) == N_TOKENS and "!" not in text and "~" not in text
        assert 0 < stats.accepted < stats.drafted, stats  # partial acceptance under the grammar


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "boolean", "enum", "string", "number"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 200)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "number":
        return {"type": "number"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    names = rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 3))
    return {"type": "object", "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": rng.sample(names, rng.randint(0, len(names))), "additionalProperties": False}


def test_random_json_schemas_give_valid_documents(model_path):
    """200 random schemas (nested objects, arrays, enums, bounded integers, strings, numbers)."""
    n_schemas = 200
    rng = random.Random(1234)
    failures = []
    # A word vocabulary (all valid UTF-8): the byte fixture can write bytes that are no
    # UTF-8, which llama.cpp's grammar counts as characters of its own reckoning.
    with Model.load(model_path("qwen35", text=fixtures.DEMO_TEXT)) as model:
        with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=3, **EXACT) as decoder:
            for index in range(n_schemas):
                schema = random_schema(rng)
                decoder.set_sampling(grammar=Grammar.from_json_schema(schema))
                decoder.reset()
                tokens = list(decoder.generate(PROMPT, max_tokens=600))
                text = b"".join(model.token_to_piece(t) for t in tokens).decode("utf-8")
                try:
                    jsonschema.validate(json.loads(text), schema)
                except (ValueError, jsonschema.ValidationError) as error:
                    failures.append((index, schema, text, str(error)[:200]))
    assert not failures, failures[:3]


def test_bad_grammars_are_clear_errors(model_path):
    with pytest.raises(InvalidArgumentError):
        Grammar("")
    with pytest.raises(LlamaError, match="JSON schema"):
        Grammar.from_json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(InvalidArgumentError):
        Grammar.from_json_schema("not a schema")
    with Model.load(model_path("qwen35")) as model:
        with model.context(n_ctx=64) as ctx, Sampler(0.0, grammar="root ::= (") as sampler:
            ctx.decode(model.tokenize(PROMPT))
            with pytest.raises(InvalidArgumentError):
                ctx.sample(sampler)
        with SpeculativeDecoder.create(model, n_ctx=64) as decoder:
            with pytest.raises(InvalidArgumentError):
                decoder.set_sampling(grammar="root ::= undefined_rule")
            assert len(list(decoder.generate(PROMPT, max_tokens=5))) == 5  # still usable
