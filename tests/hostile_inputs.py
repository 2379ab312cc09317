"""Deterministic hostile text for llama.cpp's native parsers: GBNF grammars, JSON schemas, regex patterns
(a schema's ``pattern``) and Jinja chat templates. ``cases()`` is the CI set (~300); ``cases(full=True)`` adds
more sizes and seeded random mutations and combinations (several thousand). Each case must end in a clean
error or in success, never a crash or hang; ``-valid`` cases must be accepted."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_CHARS = 2_000_000  # per case: keeps the full set's memory bounded in the test's child
JSON_DEPTH = 800  # json.dumps/loads recurse once per level; stay clear of Python's limit of 1000
PREFIX = {"gbnf": "gbnf", "json_schema": "schema", "regex": "regex", "template": "template"}
ALL_SIZES = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000)
CI_STRIDE = {"gbnf": 3, "json_schema": 3, "regex": 2, "template": 3}  # CI drops every Nth static case
Sized = list[tuple[str, Callable[[int], str], tuple[int, ...]]]  # (family, text of size n, CI sizes)


@dataclass(frozen=True)
class Case:
    kind: str  # "gbnf" | "json_schema" | "regex" | "template"
    name: str  # short unique id, e.g. "gbnf-nest-paren-100000"
    text: str  # GBNF / JSON schema as JSON text / regex pattern / Jinja source


def _rep(pre: str, unit: str, mid: str = "", close: str = "", post: str = "") -> Callable[[int], str]:
    return lambda n: pre + unit * n + mid + close * n + post  # n-fold nesting or repetition


def _num(text: str) -> Callable[[int], str]:
    return lambda n: text.replace("@", str(n))  # one huge number in valid syntax


# -- GBNF --------------------------------------------------------------------------------------------------
JSON_GBNF = r'''root ::= value
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= "-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,3})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''
CALC_GBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"  # calc\n'
GBNF_VALID = {
    "json": JSON_GBNF, "calc": CALC_GBNF, "ab-plus": 'root ::= ("a" | "b")+',
    "word-num": 'root ::= [a-z]{1,5} " " [0-9]+',
    "rules-comment": 'root ::= greeting\n# a comment\ngreeting ::= "hello" | "hi" | "hey"',
    "escapes": 'root ::= ("\\x41" | "\\u00e9" | [\\t ]) [^\\n]*',
}
GBNF_STATIC = {
    # left recursion: direct, without a base case, through a chain, behind a nullable prefix
    "left-rec-direct": 'root ::= root "a" | "a"', "left-rec-only": 'root ::= root "a"',
    "left-rec-self": "root ::= root", "left-rec-indirect": 'root ::= a\na ::= b "x" | "y"\nb ::= a "z"',
    "left-rec-nullable": 'root ::= x root "a" | "b"\nx ::= "c"?',
    # repetition of what matches nothing, and ambiguity: a naive engine loops or explodes
    "star-empty": 'root ::= ("")*', "star-nullable": 'root ::= ("a"?)*', "star-star-nullable": 'root ::= (("a"?)*)*',
    "star-star": 'root ::= "a"**', "star-plus-opt": 'root ::= "a"*+?', "star-alone": "root ::= *",
    "ambig-nested": 'root ::= (("a" | "a")* ("a" | "aa")*)*', "dot-stars": 'root ::= .* .* .* .* .* .* .* .* "a"',
    "undefined": "root ::= missing", "undefined-in-alt": 'root ::= "a" | missing', "empty-root": "root ::=",
    "empty-root-nl": "root ::=\n", "empty-rule": 'root ::= e "a"\ne ::=', "empty-group": "root ::= ()",
    "empty-alt": 'root ::= "a" | | "b"', "only-bars": "root ::= | | |", "empty-text": "", "whitespace": " \n\t\n",
    "comment-only": "# nothing", "missing-root": 'a ::= "x"', "root-capital": 'Root ::= "x"',
    "duplicate-root": 'root ::= "a"\nroot ::= "b"', "unterminated-literal": 'root ::= "abc',
    "unterminated-class": "root ::= [a-z", "unterminated-literal-escape": 'root ::= "abc\\',
    "unterminated-class-escape": "root ::= [a-\\", "unterminated-group": 'root ::= ("a"',
    "unbalanced-close": 'root ::= "a")', "quote-eof": 'root ::= "', "backslash-eof": "root ::= \\",
    "brace-open": 'root ::= "a"{1,', "brace-empty": 'root ::= "a"{}', "brace-no-min": 'root ::= "a"{,5}',
    "brace-reversed": 'root ::= "a"{5,3}', "brace-negative": 'root ::= "a"{-1}',
    "brace-overflow": 'root ::= "a"{99999999999999999999999}', "brace-three": 'root ::= "a"{1,2,3}',
    "brace-alone": "root ::= {3}", "escape-x-empty": 'root ::= "\\x"', "escape-x-short": 'root ::= "\\x4"',
    "escape-u-short": 'root ::= "\\u12"', "escape-U-short": 'root ::= "\\U1234567"',
    "escape-U-huge": 'root ::= "\\UFFFFFFFF"', "escape-surrogate": 'root ::= "\\uD800"',
    "escape-unknown": 'root ::= "\\q"', "escape-class-x": "root ::= [\\x]",
    "class-range-huge": "root ::= [\\U00000000-\\U7FFFFFFF]", "class-reversed": "root ::= [z-a]",
    "class-empty": "root ::= []", "class-negated-empty": "root ::= [^]", "class-dash": "root ::= [-]",
    "class-range-open": "root ::= [a-]",
    # NUL bytes and odd unicode: C strings end at NUL; a lone surrogate has no UTF-8 form
    "nul-literal": 'root ::= "a\x00b"', "nul-after": 'root ::= "a"\x00 junk', "nul-name": 'ro\x00ot ::= "a"',
    "nul-only": "\x00", "surrogate-literal": 'root ::= "\ud800"', "bom": '\ufeffroot ::= "a"',
    "odd-unicode": 'root ::= "\u202e\u0301\U0010ffff\uffff\u200d" [\U0010fffe-\U0010ffff\u0300-\u036f]',
    "name-digit": 'root ::= 1abc\n1abc ::= "a"', "name-unicode": 'root ::= r\u00f6\u00f6t\nr\u00f6\u00f6t ::= "a"',
    "name-dot": 'root ::= a.b\na.b ::= "a"', "name-dash": 'root ::= a-b\na-b ::= "a"', "no-assign": 'root "a"',
    "wrong-assign": 'root := "a"', "assign-twice": 'root ::= ::= "a"', "crlf": 'root ::= "a"\r\n\r\nb ::= "c"\r',
    "comment-in-literal": 'root ::= "# not a comment"', "comment-eof": 'root ::= "a" # no newline',
    # token references (newer llama.cpp syntax): ids out of range, unterminated, unknown text
    "token-huge": "root ::= <[1000000000]>", "token-negative": "root ::= !<[-1]>", "token-open": "root ::= <[12",
    "token-text": "root ::= <|im_end|>",
}
GBNF_SIZED: Sized = [  # each text follows "root ::= "
    ("nest-paren", _rep("", "(", '"a"', ")"), (10, 100_000)), ("nest-alt", _rep("", '("a" | ', '"b"', ")"), (100_000,)),
    ("nest-star", _rep("", "(", '"a"', ")*"), (10, 100_000)), ("nest-opt", _rep("", "(", '"a"', ")?"), (10_000,)),
    ("nest-rep", _rep("", "(", '"a"', "){1,2}"), (10, 10_000)),  # 2**n if expanded
    ("ref-chain", lambda n: "r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= "a"', (10, 10**5)),
    ("ref-fanout", lambda n: "r0\n" + "".join(f"r{i} ::= r{i + 1} r{i + 1}\n" for i in range(n)) + f'r{n} ::= "a"',
     (100, 10_000)),  # each rule uses the next twice: 2**n if inlined
    ("left-rec-chain", lambda n: "r0\n" + "".join(f'r{i} ::= r{(i + 1) % n} "a" | "b"\n' for i in range(n)), (2, 1000)),
    ("rep-max", _num('"a"{0,@}'), (1000, 10**12)), ("rep-exact", _num('"a"{@}'), (100_000, 10**9)),
    ("rep-min", _num('"a"{@,}'), (10**6,)), ("rep-square", _num('("a"{@}){@}'), (100, 10_000)),
    ("many-alts", lambda n: " | ".join(f'"a{i}"' for i in range(n)), (10, 100_000)),
    ("ambig-alts", _rep("(", '"a" | ', '"a")*'), (3, 10_000)), ("ambig-stars", _rep("", '"a"* ', '"b"'), (10, 1000)),
    ("seq-long", _rep("", '"a" '), (100_000,)), ("huge-literal", _rep('"', "a", '"'), (10**6,)),
    ("huge-escapes", _rep('"', "\\u00e9\\n", '"'), (100_000,)), ("huge-class", _rep("[", "a-z0-9", "]"), (100_000,)),
    ("huge-comment", _rep('"a"\n# ', "x"), (10**6,)),
    ("huge-negclass", lambda n: "[^" + "".join(chr(0x100 + i % 0xD000) for i in range(n)) + "]", (10_000,)),
    ("long-name", lambda n: "r" * n + "\n" + "r" * n + ' ::= "a"', (100_000,)),
    ("many-undefined", lambda n: " ".join(f"u{i}" for i in range(n)), (10_000,)),
]
GBNF_TOKENS = list('()[]{}"*+?|:=\\') + ["\n", " ", "root", "::=", "-", "^", "."]

# -- JSON schema -------------------------------------------------------------------------------------------
SCHEMA_VALID: dict[str, Any] = {
    "object": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
               "required": ["name"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    "enum": {"enum": ["red", "green", "blue"]}, "pattern": {"type": "string", "pattern": "^[a-z]{1,5}$"},
    "ref": {"$ref": "#/$defs/item", "$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"}}}}},
    "anyof": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "boolean"}]},
}
SCHEMA_STATIC: dict[str, Any] = {
    "empty": {}, "false": False, "true": True, "null": None, "number": 5, "string": "x", "list": [],
    "ref-self": {"$ref": "#"}, "ref-self-def": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
    "ref-cycle-ab": {"$ref": "#/definitions/a",
                     "definitions": {"a": {"$ref": "#/definitions/b"}, "b": {"$ref": "#/definitions/a"}}},
    "ref-required-cycle": {"$ref": "#/$defs/a",
                           "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 1}}},
    "ref-optional-cycle": {"type": "object", "properties": {"next": {"$ref": "#"}}},
    "ref-missing": {"$ref": "#/definitions/nope"}, "ref-remote": {"$ref": "http://example.com/s.json"},
    "ref-odd-pointers": {"anyOf": [{"$ref": r} for r in ("", "#/", "#//", "#foo", "#/$defs/a~1b", "#/$defs/~2",
                                                          "#/$defs/%25", "#/required/0", "#/anyOf/-1", "#/$defs")],
                         "$defs": {"a/b": {}}, "required": ["x"]},
    "ref-not-string": {"anyOf": [{"$ref": 5}, {"$ref": None}, {"$ref": []}]}, "type-number": {"type": 5},
    "type-empty-list": {"type": []}, "type-mixed-list": {"type": ["string", 5]},
    "properties-list": {"type": "object", "properties": []}, "type-unknown": {"type": "strin"},
    "property-number": {"type": "object", "properties": {"a": 5}}, "required-string": {"required": "a"},
    "items-number": {"type": "array", "items": 5}, "anyof-object": {"anyOf": {}}, "anyof-empty": {"anyOf": []},
    "allof-empty": {"allOf": []}, "allof-conflict": {"allOf": [{"type": "string"}, {"type": "integer"}]},
    "enum-number": {"enum": 5}, "enum-empty": {"enum": []}, "const-object": {"const": {"a": [1, {"b": None}]}},
    "additional-number": {"type": "object", "additionalProperties": 5},
    "additional-schema": {"type": "object", "additionalProperties": {"type": "array", "items": {"$ref": "#"}}},
    "additional-false-required": {"type": "object", "additionalProperties": False, "required": ["ghost"]},
    "pattern-props": {"type": "object", "patternProperties": {"(a*)*b": {}}, "additionalProperties": False},
    "format-odd": {"anyOf": [{"type": "string", "format": f} for f in ("date-time", "uuid", "nope", 5)]},
    "prefix-items-number": {"type": "array", "prefixItems": 5},
    "num-huge": {"type": "integer", "minimum": -10**100, "maximum": 10**100},
    "min-gt-max": {"type": "array", "minItems": 5, "maxItems": 2},
    "num-floats": {"type": "number", "minimum": -1e308, "maximum": 1e308, "exclusiveMinimum": 1e-320},
    "num-reversed": {"type": "integer", "minimum": 10, "maximum": -10},
    "num-nonfinite": {"type": "number", "minimum": float("-inf"), "maximum": float("nan")},  # Python's json allows
    "num-narrow": {"type": "integer", "minimum": 10**18, "maximum": 10**18 + 5, "multipleOf": 0},
    "pattern-number": {"type": "string", "pattern": 5},
    "pattern-nested-star": {"type": "string", "pattern": "^((a*)*)*b$"},
    "pattern-huge-count": {"type": "string", "pattern": "^a{1000000}$"},
    "pattern-unbalanced": {"type": "string", "pattern": "^(a$"},
    "pattern-in-props": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?=a)\\1[z-a]$"}}},
}
LENGTH_KEYWORDS = {m + k: t for m in ("min", "max") for k, t in (("Items", "array"), ("Length", "string"),
                                                                  ("Properties", "object"))}
BAD_COUNTS: list[Any] = [10**9, -1, 1.5, "x", 10**30, None, True, 10**6]


def _nest(n: int, wrap: Callable[[Any], Any], leaf: Any) -> Any:
    for _ in range(n):
        leaf = wrap(leaf)
    return leaf


def _defs(n: int, body: Callable[[int], Any]) -> Any:  # flat definitions d0..dn-1: many refs, no JSON depth
    return {"$ref": "#/$defs/d0", "$defs": {f"d{i}": body(i) for i in range(n)}}


# (family, schema of size n, JSON levels each unit of n adds (0: flat), CI sizes)
SCHEMA_SIZED: list[tuple[str, Callable[[int], Any], int, tuple[int, ...]]] = [
    ("nest-props", lambda n: _nest(n, lambda x: {"properties": {"a": x}, "required": ["a"]}, {}), 2, (10, 400)),
    ("nest-items", lambda n: _nest(n, lambda x: {"type": "array", "items": x}, {}), 1, (1, 800)),
    ("nest-anyof", lambda n: _nest(n, lambda x: {"anyOf": [x, {"type": "null"}]}, {}), 2, (400,)),
    ("nest-allof", lambda n: _nest(n, lambda x: {"allOf": [x]}, {"type": "integer"}), 2, (100,)),
    ("nest-min-items", lambda n: _nest(n, lambda x: {"type": "array", "items": x, "minItems": 10}, {}), 1, (6,)),
    ("ref-chain", lambda n: _defs(n, lambda i: {"$ref": f"#/$defs/d{i + 1}"} if i < n - 1 else {"type": "string"}),
     0, (10, 10_000)),
    ("ref-cycle", lambda n: _defs(n, lambda i: {"$ref": f"#/$defs/d{(i + 1) % n}"}), 0, (2, 10_000)),
    ("ref-required-cycle", lambda n: _defs(n, lambda i: {"type": "object", "required": ["x"],
                                                         "properties": {"x": {"$ref": f"#/$defs/d{(i + 1) % n}"}}}),
     0, (3,)),
    ("ref-long-pointer", lambda n: {"$ref": "#/" + "/".join(["a"] * n)}, 0, (100_000,)),
    ("enum", lambda n: {"enum": [f"v{i}" for i in range(n)]}, 0, (10, 100_000)),
    ("enum-mixed", lambda n: {"enum": [[i, 1.5 * i, None, {"k": str(i)}][i % 4] for i in range(n)]}, 0, (10_000,)),
    ("anyof-wide", lambda n: {"anyOf": [{"const": f"c{i}"} for i in range(n)]}, 0, (10_000,)),
    ("many-props", lambda n: {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)},
                              "required": [f"p{i}" for i in range(n)]}, 0, (10_000,)),
    ("many-required", lambda n: {"type": "object", "required": [f"r{i}" for i in range(n)]}, 0, (10_000,)),
    ("min-items", lambda n: {"type": "array", "items": {"type": "integer"}, "minItems": n}, 0, (10**6, 10**9)),
    ("max-length", lambda n: {"type": "string", "maxLength": n}, 0, (10**12,)),
    ("int-range", lambda n: {"type": "integer", "minimum": -n, "maximum": n}, 0, (10**40,)),
]
# Raw text: nesting far past what Python's json can build, written by concatenation.
SCHEMA_RAW: dict[str, Callable[[int], str]] = {
    "raw-items": _rep("", '{"type":"array","items":', '{"type":"string"}', "}"), "raw-array": _rep("", "[", "", "]"),
    "raw-anyof": _rep("", '{"anyOf":[', '{"type":"null"}', "]}"),
    "raw-props": _rep("", '{"type":"object","properties":{"a":', "{}", "}}"),
}


def _random_schema(rng: random.Random, depth: int) -> Any:
    """A random mix of the keywords above, with bad values and refs that may or may not resolve."""
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice([{}, True, False, {"type": "string"}, {"type": "integer"}, {"$ref": "#/$defs/d0"},
                           {"$ref": "#/$defs/d1"}, {"$ref": "#"}, {"$ref": "#/nope"}, {"type": 5}, {"enum": []}])
    sub = lambda: _random_schema(rng, depth - 1)  # noqa: E731
    count = lambda *keys: {rng.choice(keys): rng.choice(BAD_COUNTS)}  # noqa: E731
    return rng.choice([
        lambda: {"type": "object", "properties": {f"k{i}": sub() for i in range(rng.randrange(4))},
                 "required": [f"k{i}" for i in range(rng.randrange(4))], "additionalProperties": sub()},
        lambda: {"type": "array", "items": sub(), **count("minItems", "maxItems")},
        lambda: {rng.choice(["anyOf", "allOf", "oneOf"]): [sub() for _ in range(rng.randrange(4))]},
        lambda: {"type": "string", "pattern": "^" + _random_regex(rng, 3) + "$", **count("minLength", "maxLength")},
        lambda: {"$defs": {"d0": sub(), "d1": sub()}, "$ref": rng.choice(["#/$defs/d0", "#/$defs/d1", "#"])},
        lambda: {"type": "integer", "minimum": rng.choice([-10**50, 0, 1.5]), "maximum": rng.choice([-1, 10**50, 2.5])},
        lambda: {"enum": [rng.choice([1, "a", None, [sub()]]) for _ in range(rng.randrange(5))]},
    ])()


# -- regex -------------------------------------------------------------------------------------------------
REGEX_VALID = {"word": "^[a-z]+$", "phone": "^[0-9]{3}-[0-9]{4}$", "alts": "^(foo|bar)+$", "classes": "^\\w+\\s?\\d*$"}
REGEX_STATIC = {  # anchored, so that llama.cpp gets past any ^...$ check to the pattern itself
    "nested-star": "^(a*)*$", "nested-plus": "^(a+)+b$", "alt-star": "^(a|a)*$", "alt-overlap": "^(a|aa)*b$",
    "open-paren": "^($", "dot-star-star": "^(.*)*$", "open-bracket": "^[$", "close-paren": "^)$",
    "close-bracket": "^]$", "parens-unbalanced": "^(()$", "class-open-range": "^[a-$", "brace-open": "^a{$",
    "brace-min": "^a{1$", "brace-comma": "^a{1,$", "brace-reversed": "^a{2,1}$", "brace-alone": "^{3}$",
    "lone-backslash": "\\", "trailing-backslash": "^a\\", "escape-x": "^\\x$", "escape-u-short": "^\\u12$",
    "class-reversed": "^[z-a]$", "escape-p": "^\\p{L}$", "class-reversed-hex": "^[\\x7f-\\x00]$", "class-empty": "^[]$",
    "lookahead": "^(?=a)a$", "class-neg-empty": "^[^]$", "neg-lookahead": "^(?!a).$", "lookbehind": "^(?<=a)b$",
    "backref": "^(a)\\1$", "backref-missing": "^\\9$", "named-group": "^(?P<n>a)(?P=n)$", "inline-flag": "^(?i)a$",
    "anchors-middle": "^a^b$c$", "anchors-many": "^^^$$$", "anchors-starred": "^(^a|b$)*$", "quant-nothing": "^*$",
    "quant-double": "^a**$", "quant-stack": "^a{1}{2}+?$", "unanchored": "(a*)*b", "nul": "^a\x00b$",
    "surrogate": "^\ud800$", "astral": "^[\U0010fffe-\U0010ffff]+$", "empty": "", "anchors-only": "^$",
}
REGEX_SIZED: Sized = [  # wrapped in ^...$ when generated
    ("nest-group", _rep("", "(", "a", ")"), (10, 100_000)), ("nest-noncap", _rep("", "(?:", "a", ")"), (10_000,)),
    ("nest-star", _rep("", "(", "a", ")*"), (10, 10_000)), ("nest-rep", _rep("", "(", "a", "){1,3}"), (100,)),
    ("rep-exact", _num("a{@}"), (10**6, 10**12)), ("rep-range", _num("a{0,@}"), (10**6,)),
    ("rep-square", _num("(a{@}){@}"), (1000,)),
    ("alternation", lambda n: "|".join(f"a{i}" for i in range(n)), (100_000,)),
    ("class-long", _rep("[", "a-z", "]"), (100_000,)), ("dot-stars", _rep("", ".*"), (1000,)),
    ("literal-long", _rep("", "b"), (10**6,)),
]


def _random_regex(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.3:
        return rng.choice("a . [a-z] [^x] \\d \\w [z-a] \\ (?=a) \\1 ^ $ [ ) |".split())
    body = rng.choice(["", "|"]).join(_random_regex(rng, depth - 1) for _ in range(rng.randrange(1, 4)))
    quant = rng.choice(["", "*", "+", "?", "{3}", "{0,1000}", "{100000}", "{2,1}", "*?", "{,5}", "{1,}"])
    return (f"({body})" if rng.random() < 0.6 else body) + quant


# -- Jinja templates ---------------------------------------------------------------------------------------
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEMPLATE_VALID = {
    "chatml": CHATML,
    "loop-flags": "{% for m in messages %}{% if loop.first %}[start]{% endif %}{{ m.role }}: {{ m.content }}\n"
                  "{% if loop.last %}[end]{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}#{{ ns.n }} "
                 "{{ m['role'] | upper }} {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
    "macro": "{% macro turn(role, text) %}<{{ role }}>{{ text }}</{{ role }}>{% endmacro %}{% for m in messages %}"
             "{{ turn(m.role, m.content) }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
}

I64 = "9223372036854775807"  # past the engine's 64-bit integers
TEMPLATE_STATIC = {
    "recursive-macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "mutual-recursion": "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}{{ a(0) }}",
    "recursive-fanout": "{% macro f(n) %}{{ f(n) ~ f(n) }}{% endmacro %}{{ f(0) }}",
    "loop-cycle": "{% for m in messages %}{{ loop.cycle('a', 'b') }}{{ loop.index0 }}{{ loop.revindex }}"
                  "{{ loop.previtem }}{{ loop.nextitem }}{{ m.content }}{% endfor %}",
    "unclosed-for": "{% for m in messages %}x", "unclosed-if": "{% if true %}", "unclosed-expr": "{{ 1 + ",
    "unclosed-tag": "{% for", "unclosed-comment": "{# never closed", "unclosed-string": "{{ 'abc }}",
    "stray-endfor": "{% endfor %}", "stray-endif": "x{% endif %}", "stray-close": "}} %} #}",
    "for-no-iter": "{% for x in %}{% endfor %}", "unknown-tag": "{% frobnicate %}", "empty": "",
    "undefined-filter": "{{ 'x' | no_such_filter }}", "undefined-test": "{{ 1 is no_such_test }}",
    "undefined-call": "{{ nothing_here() }}", "raise": "{{ raise_exception('x') }}",
    "attr-of-undefined": "{{ nothing.deeper.still[0] }}", "raise-non-string": "{{ raise_exception(messages) }}",
    "div-zero": "{{ 1 / 0 }}", "floordiv-zero": "{{ 1 // 0 }}", "mod-zero": "{{ 1 % 0 }}",
    "fdiv-zero": "{{ 1.0 / 0.0 }}", "int-overflow": "{{ " + I64 + " + 1 }}",
    "int-literal-huge": "{{ 1" + "0" * 400 + " }}", "min-int-div": "{{ (-" + I64 + " - 1) // -1 }}",
    "pow-negative": "{{ 2 ** -1 }}", "slice-huge-step": "{{ 'abcdef'[::" + I64 + "] }}",
    "slice-neg-step": "{{ 'abcdef'[::-" + I64 + "] }}", "slice-zero-step": "{{ 'abc'[::0] }}",
    "slice-huge-bounds": "{{ messages[-" + I64 + ":" + I64 + "] }}", "index-huge": "{{ messages[" + I64 + "] }}",
    "index-neg": "{{ 'abc'[-100] }}",
    "namespace-abuse": "{% set ns = namespace() %}{% set ns.ns = ns %}{{ ns }}{{ ns.ns.ns.ns.x }}{{ ns | tojson }}",
    "namespace-args": "{{ namespace(1, 2, a=3, a=4) }}",
    "self-list": "{% set l = [] %}{% set _ = l.append(l) %}{{ l }}",
    "tojson-huge": "{{ range(1000000) | list | tojson }}", "join-huge": "{{ range(10000000) | join(',') | length }}",
    "split-huge": "{{ ('x,' * 1000000).split(',') | length }}", "split-empty-sep": "{{ 'abc'.split('') }}",
    "replace-blowup": "{{ ('a' * 10000).replace('a', 'aaaaaaaaaa').replace('a', 'aaaaaaaaaa') | length }}",
    "indent-huge": "{{ 'x\ny' | indent(1000000000) }}", "truncate-neg": "{{ 'abc' | truncate(-5) }}",
    "strftime": "{{ strftime_now('%Q%%%' * 1000) }}", "format-bad": "{{ '%s %d %q' | format(1) }}",
    "set-messages": "{% set messages = 5 %}{% for m in messages %}{% endfor %}",
    "loop-over-int": "{% for x in 5 %}{% endfor %}", "call-string": "{{ 'abc'() }}", "nul": "{{ 'a\x00b' }}\x00",
    "surrogate": "{{ '\ud800' }}",
    "filter-block": "{% filter upper %}{% filter no_such %}x{% endfilter %}{% endfilter %}",
    "break-outside": "{% break %}",
    "call-block": "{% macro f() %}{{ caller() }}{% endmacro %}{% call f() %}x{% endcall %}",
}
TEMPLATE_SIZED: Sized = [
    ("nest-paren", _rep("{{ ", "(", "1", ")", " }}"), (10, 100_000)),
    ("nest-if", _rep("", "{% if true %}", "x", "{% endif %}"), (10, 50_000)),
    ("nest-for", _rep("", "{% for i in [1] %}", "x", "{% endfor %}"), (10_000,)),
    ("nest-list", _rep("{{ ", "[", "", "]", " }}"), (100_000,)),
    ("nest-dict", _rep("{{ ", "{'a': ", "1", "}", " }}"), (100_000,)),
    ("filter-chain", _rep("{{ 'x'", "|upper|lower", " }}"), (1000, 100_000)),
    ("add-chain", _rep("{{ ", "1 + ", "1 }}"), (100_000,)),
    ("concat-chain", _rep("{{ ", "'a' ~ ", "'a' }}"), (100_000,)),
    ("not-chain", _rep("{{ ", "not ", "true }}"), (100_000,)), ("neg-chain", _rep("{{ ", "- ", "1 }}"), (10_000,)),
    ("attr-chain", _rep("{{ messages", ".x", " }}"), (100_000,)),
    ("range-loop", _num("{% for i in range(@) %}x{% endfor %}"), (10, 10**9)),
    ("nested-loops", _rep("", "{% for i in range(100000) %}", "x", "{% endfor %}"), (2,)),  # 100000**n iterations
    ("string-mult", _num("{{ 'x' * @ }}"), (10**10,)), ("pow", _num("{{ 10 ** @ }}"), (100_000,)),
    ("doubling", _num("{% set ns = namespace(s='x') %}{% for i in range(@) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                      "{{ ns.s | length }}"), (40, 1000)),  # a string of 2**n
    ("macro-depth", _num("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(@) }}"), (100_000,)),
    ("huge-string", _rep("{{ '", "x", "' }}"), (10**6,)),
    ("many-sets", lambda n: "".join(f"{{% set v{i} = {i} %}}" for i in range(n)), (50_000,)),
    ("many-open", _rep("", "{%"), (100_000,)), ("plain-text", _rep("", "x"), (10**6,)),
]
TEMPLATE_TOKENS = list("{}%#()[]'\"|~.,=-+*/") + "{% %} {{ }} endfor endif for if loop".split() + [" in "]
TEMPLATE_SNIPPETS = [v for v in TEMPLATE_STATIC.values() if len(v) < 200]

# -- assembly ----------------------------------------------------------------------------------------------


def _mutate(rng: random.Random, text: str, edits: int, tokens: list[str]) -> str:
    """Delete, duplicate or insert at random places: near-valid input reaches deep into a parser."""
    out = list(text)
    for _ in range(edits):
        op, i = rng.randrange(3), rng.randrange(len(out) + 1)
        if op < 2 and out:
            i = min(i, len(out) - 1)
            out[i:i + 1] = [] if op == 0 else [out[i], out[i]]
        else:
            out.insert(i, rng.choice(tokens))
    return "".join(out)


def _sizes(ci: tuple[int, ...], full: bool, make: Callable[[int], str], cap: int | None) -> list[int]:
    # full adds ALL_SIZES whose text, growing linearly from size 10's, fits: nothing huge is built to be dropped
    extra = [n for n in ALL_SIZES if n not in ci and (n <= 10 or len(make(10)) * n // 10 <= MAX_CHARS)] if full else []
    return [n for n in sorted({*ci, *extra}) if cap is None or n <= cap]


def _generate(full: bool, seed: int) -> Iterator[tuple[str, str, str]]:
    rng = random.Random(seed)
    dumps = lambda table: {k: json.dumps(v) for k, v in table.items()}  # noqa: E731
    valid = {"gbnf": GBNF_VALID, "json_schema": dumps(SCHEMA_VALID), "regex": REGEX_VALID, "template": TEMPLATE_VALID}
    static = {"gbnf": GBNF_STATIC, "json_schema": dumps(SCHEMA_STATIC), "regex": REGEX_STATIC,
              "template": TEMPLATE_STATIC}
    wrap = lambda pre, table, post="": [(f, lambda n, m=m: pre + m(n) + post, ci) for f, m, ci in table]  # noqa
    sized = {"gbnf": wrap("root ::= ", GBNF_SIZED), "regex": wrap("^", REGEX_SIZED, "$"), "template": TEMPLATE_SIZED,
             "json_schema": [(f, lambda n, b=b: json.dumps(b(n)), ci) for f, b, _, ci in SCHEMA_SIZED]}
    caps = {("json_schema", f): JSON_DEPTH // lv for f, _, lv, _ in SCHEMA_SIZED if lv}  # where Python's json stops
    caps |= {("template", "nested-loops"): 20, ("template", "doubling"): 4096}
    for kind in PREFIX:
        yield from ((kind, f"{key}-valid", text) for key, text in valid[kind].items())
        for i, (key, text) in enumerate(static[kind].items()):
            if full or i % CI_STRIDE[kind] != CI_STRIDE[kind] - 1:  # CI: a spread subset; full: all
                yield kind, key, text
        for family, make, ci in sized[kind]:
            yield from ((kind, f"{family}-{n}", make(n)) for n in _sizes(ci, full, make, caps.get((kind, family))))
    for k, (kw, typ) in enumerate(LENGTH_KEYWORDS.items()):
        items = {"items": {"type": "integer"}} if typ == "array" else {}
        for v in BAD_COUNTS if full else [BAD_COUNTS[k % 4]]:
            yield "json_schema", f"{kw}-{v}", json.dumps({"type": typ, kw: v, **items})
    for key, raw in SCHEMA_RAW.items():
        yield from (("json_schema", f"{key}-{n}", raw(n)) for n in ((5000, 50_000) if full else (5000,)))
    for kind, bases, count, tokens in (("gbnf", (JSON_GBNF, CALC_GBNF), 1500 if full else 16, GBNF_TOKENS),
                                       ("template", (CHATML,), 1000 if full else 8, TEMPLATE_TOKENS)):
        for i in range(count):
            yield kind, f"mutate-{i}", _mutate(rng, bases[i % len(bases)], rng.randint(1, 8 if full else 3), tokens)
    for i in range(300 if full else 4):  # a hostile snippet spliced into the benign template
        at = rng.randrange(len(CHATML) + 1)
        yield "template", f"splice-{i}", CHATML[:at] + rng.choice(TEMPLATE_SNIPPETS) + CHATML[at:]
    seen: set[str] = set()
    for i in range(1200 if full else 0):  # random combinations of the families' pieces, each text once
        text = json.dumps(_random_schema(rng, 6)) if i % 2 else "^" + _random_regex(rng, 6) + "$"
        if text not in seen:
            seen.add(text)
            yield ("regex", "json_schema")[i % 2], f"random-{i // 2}", text


def cases(full: bool = False, seed: int = 0) -> list[Case]:
    """The CI set (full=False) or the full set: the same list for the same arguments, names unique."""
    out = [Case(kind, f"{PREFIX[kind]}-{key}", text) for kind, key, text in _generate(full, seed)
           if len(text) <= MAX_CHARS]  # over it: a CI size past the budget at its family's growth rate
    assert len({case.name for case in out}) == len(out), "case names must be unique"
    return out
