"""Constrained output: a GBNF grammar (written by hand, or made from a JSON schema by
llama.cpp's json-schema-to-grammar) that the target's choices must follow.

With MTP the drafts stay unconstrained; the grammar masks the target at verification
and advances over accepted tokens only (see :meth:`SpeculativeDecoder.set_sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from . import _sandbox
from .errors import InvalidArgumentError

__all__ = ["Grammar", "GrammarLike"]

_KINDS = ("user", "output_format", "tool_calls")


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar with root rule ``root``.

    ``kind`` says where it starts: ``"user"`` grammars constrain the whole output; the
    grammars a chat template makes (``"output_format"``, ``"tool_calls"``) start after
    the template's generation prompt, which llama.cpp feeds them first. A ``lazy``
    grammar stays off until one of its ``triggers`` appears in the output (tool calls).
    """

    gbnf: str
    kind: str = "user"
    lazy: bool = False
    triggers: tuple[Mapping[str, Any], ...] = ()
    generation_prompt: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.gbnf, str) or not self.gbnf.strip():
            raise InvalidArgumentError("a grammar needs GBNF text with a 'root' rule")
        if self.kind not in _KINDS:
            raise InvalidArgumentError(f"grammar kind must be one of {_KINDS}, got {self.kind!r}")

    @classmethod
    def from_json_schema(cls, schema: Union[Mapping[str, Any], bool]) -> "Grammar":
        """The grammar of JSON documents that validate against ``schema``."""
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidArgumentError(f"a JSON schema is an object or a bool, got {type(schema).__name__}")
        # In the text sandbox: a schema nested deeply enough recurses past llama.cpp's stack.
        return cls(_sandbox.schema_to_grammar(dict(schema) if isinstance(schema, Mapping) else schema))

    @classmethod
    def from_chat(cls, rendered: Mapping[str, Any]) -> Optional["Grammar"]:
        """The grammar a rendered chat request carries (None when it has none)."""
        if not rendered.get("grammar"):
            return None
        return cls(rendered["grammar"], kind=rendered.get("grammar_type", "output_format"),
                   lazy=bool(rendered.get("grammar_lazy")),
                   triggers=tuple(rendered.get("grammar_triggers") or ()),
                   generation_prompt=rendered.get("generation_prompt") or "")

    def constraint(self) -> dict[str, Any]:
        """The JSON the shim's sampler takes."""
        return {"grammar": self.gbnf, "grammar_type": self.kind, "grammar_lazy": self.lazy,
                "grammar_triggers": [dict(trigger) for trigger in self.triggers],
                "generation_prompt": self.generation_prompt}


GrammarLike = Union[Grammar, str, None]


def as_grammar(grammar: GrammarLike) -> Optional[Grammar]:
    """A Grammar from a Grammar, GBNF text or None."""
    if grammar is None or isinstance(grammar, Grammar):
        return grammar
    if isinstance(grammar, str):
        return Grammar(grammar)
    raise InvalidArgumentError(f"grammar must be GBNF text or a Grammar, got {type(grammar).__name__}")
