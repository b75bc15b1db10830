"""Prompts as versioned files: one YAML file per task, with its template and the JSON schema of its output.

A prompt file (`operators/resources/prompts/<name>.yaml`, or a user folder) holds:

    name: label_abilities
    version: 2                   # bump when the wording changes: cached answers of v1 stop matching
    system: ...                  # optional
    template: |                  # string.Template: $instruction, $strategy, ... (JSON braces need no escaping)
      ...
    response_prefix: '{"abilities": ['   # optional: the assistant turn starts with this (steers small models)
    examples: [{instruction: ..., output: ...}]  # optional few-shot turns
    output_schema: {...}         # optional JSON schema; the client validates every output against it
    sampling: {max_tokens: 128}  # defaults for this task
    variants: {name: text}       # optional named snippets a step picks from (substituted as $variant)

The version goes into every cache key, so editing a prompt without bumping it is caught by a hash of the
file's text, also in the key.
"""

from __future__ import annotations

import hashlib
import string
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from operators.llm.base import Message, SamplingConfig


class PromptError(ValueError):
    """A prompt file is missing, malformed, or a template variable was not supplied."""


class PromptTask(BaseModel):
    """A typed LLM task: how to ask, and what shape the answer must have."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = Field(ge=1)
    description: str = ""
    system: str | None = None
    template: str
    response_prefix: str = ""
    output_schema: dict[str, Any] | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    examples: list[dict[str, str]] = Field(
        default_factory=list,
        description="Few-shot turns: template values plus `output`, rendered as earlier user/assistant turns.")
    variants: dict[str, str] = Field(
        default_factory=dict, description="Named snippets a step substitutes as $variant (e.g. evolution strategies).")

    @property
    def cache_version(self) -> str:
        """Name, version and a hash of the wording: any edit changes the cache key."""
        wording = [self.system or "", self.template, self.response_prefix, *sorted(self.variants.items()),
                   *(sorted(e.items()) for e in self.examples)]
        digest = hashlib.sha256(repr(wording).encode()).hexdigest()[:10]
        return f"{self.name}@v{self.version}#{digest}"

    def variables(self) -> set[str]:
        """Names the template expects."""
        return {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(self.template)
                if m.group("named") or m.group("braced")}

    def render(self, values: dict[str, str]) -> list[Message]:
        """The chat messages for one request (ending with the response prefix as an assistant turn)."""
        missing = self.variables() - values.keys()
        if missing:
            raise PromptError(f"prompt {self.name!r} needs {sorted(missing)}")
        messages: list[Message] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for example in self.examples:  # few-shot: small models follow shown turns better than described ones
            shown = {**values, **{k: v for k, v in example.items() if k != "output"}}
            messages.append({"role": "user", "content": string.Template(self.template).safe_substitute(shown)})
            messages.append({"role": "assistant", "content": example["output"]})
        messages.append({"role": "user", "content": string.Template(self.template).safe_substitute(values)})
        if self.response_prefix:
            messages.append({"role": "assistant", "content": self.response_prefix})
        return messages


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def coerce_bool_field(value: Any, key: str) -> Any:
    """A judge's parsed answer with its `key` verdict as a boolean: small models write 1, "yes" or "True" for
    true. Anything else is left as it is, for the task's schema to refuse."""
    if isinstance(value, dict) and not isinstance(value.get(key), bool):
        v = value.get(key)
        if isinstance(v, int | float) and v in (0, 1):
            return {**value, key: bool(v)}
        if isinstance(v, str) and v.strip().lower() in _BOOL_WORDS:
            return {**value, key: _BOOL_WORDS[v.strip().lower()]}
    return value


def load_prompt(name: str, folder: str | None = None) -> PromptTask:
    """Load prompt `name` from `folder` (a local directory) or from the prompts this package ships."""
    if not name.replace("_", "").isalnum():
        raise PromptError(f"bad prompt name {name!r}")
    if folder:
        path = Path(folder) / f"{name}.yaml"
        if not path.is_file():
            raise PromptError(f"prompt file {path} not found")
        text = path.read_text()
    else:
        try:
            text = (resources.files("operators") / "resources" / "prompts" / f"{name}.yaml").read_text()
        except FileNotFoundError:
            raise PromptError(f"no packaged prompt {name!r}") from None
    try:
        data = yaml.safe_load(text)
        return PromptTask.model_validate(data)
    except (yaml.YAMLError, ValueError) as e:
        raise PromptError(f"prompt {name!r} is malformed: {e}") from e
