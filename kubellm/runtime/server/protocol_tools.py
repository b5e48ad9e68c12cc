"""OpenAI tool calling's request and response bodies (chat: `tools`, `tool_choice`, `tool_calls`), and the JSON
schema a grammar enforces when the request forces a call (`tool_choice` "required" or a named function)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionDefinition(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _check_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """A schema llguidance cannot enforce is a 400 naming the tool, whatever tool_choice is."""
        if value is not None:
            import llguidance

            error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(value), None)
            if error:
                raise ValueError(f"not a usable JSON schema: {error}")
        return value


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Open):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(_Open):
    """A call the assistant made: in a response, and in the history of a later request."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


def parameters_schema(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def forced_call_schema(tools: list[Tool], choice: ToolChoice, parallel: bool) -> dict[str, Any] | None:
    """The JSON schema of what the model must write when a call is forced (None when it is not): for a named
    function, its arguments; for "required", an array of {"name", "parameters"} objects, one per call (at most
    one unless parallel calls are allowed). Raises ValueError for a name that is no tool's."""
    if isinstance(choice, NamedToolChoice):
        for tool in tools:
            if tool.function.name == choice.function.name:
                return parameters_schema(tool)
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not one of the tools")
    if choice != "required":
        return None
    if not tools:
        raise ValueError('tool_choice "required" needs at least one tool')
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": parameters_schema(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


# ------------------------------------------------------------------ OpenAI's legacy function calling
def legacy_functions_as_tools(data: dict[str, Any]) -> dict[str, Any]:
    """A chat request body using OpenAI's deprecated function calling, rewritten as the tools request it stands
    for (as OpenAI did): `functions` → `tools`, `function_call` ("none", "auto" or {"name"}) → `tool_choice`,
    at most one call (`parallel_tool_calls` false); in the history, an assistant's `function_call` becomes a
    tool call and a `function` message that call's result. The original fields stay in the body (the answer is
    shaped as legacy too: `message.function_call`). Raises ValueError for a mix of both styles."""
    if not isinstance(data, dict) or ("functions" not in data and "function_call" not in data):
        return data
    functions, choice = data.get("functions"), data.get("function_call")
    if functions in (None, []):
        if choice not in (None, "none", "auto"):
            raise ValueError("function_call names a function, but the request has no functions")
        return data
    if data.get("tools") is not None or data.get("tool_choice") is not None:
        raise ValueError("use either tools and tool_choice or the legacy functions and function_call, not both")
    if not isinstance(functions, list):
        raise ValueError("functions must be a list of function definitions")
    out = {**data, "tools": [{"type": "function", "function": f} for f in functions], "parallel_tool_calls": False}
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "function": choice}
    elif choice is not None:
        out["tool_choice"] = choice
    if isinstance(data.get("messages"), list):
        out["messages"] = _legacy_history(data["messages"])
    return out


def _legacy_history(messages: list) -> list:
    """Legacy turns as tool turns: each assistant function_call gets an id, and the function message after it
    answers that id."""
    out, last_call = [], None
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("function_call"), dict):
            last_call = f"call_{i}"
            m = {k: v for k, v in m.items() if k != "function_call"}
            m["tool_calls"] = [{"id": last_call, "type": "function", "function": messages[i]["function_call"]}]
        elif isinstance(m, dict) and m.get("role") == "function":
            m = {**m, "role": "tool", "tool_call_id": last_call}
        out.append(m)
    return out
