"""The standard pre-norm decoder layer, recognised by its forward's code.

Llama, Mistral, Qwen2/3, Gemma, Mixtral and many more write their decoder layer's forward as::

    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(...)          # the forward's own arguments, passed on by name
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states

``read(forward)`` parses a forward (decorators and checkpointing wrappers unwrapped) and returns the
``AttentionCall`` it makes, or one line saying which statement differs: a norm after the attention
(Gemma 2/3, OLMo 2), a scaled residual (Granite), a dropout (Phi-3), a branch (hybrid layers).
Comments, docstrings and the name of the discarded attention weights do not matter. Of decorators,
only transformers' ``auto_docstring`` (documentation) and ``deprecate_kwarg`` (a keyword renamed: the
fused forward wears the same one) are allowed. A layer read here may have its residual add and
post-attention norm fused (``forwards.prenorm_layer_forward``).
"""

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass

HIDDEN, RESIDUAL = "hidden_states", "residual"
ATTENTION_AT = 2  # the attention call's place in the pattern
PATTERN = [
    ast.parse(line).body[0]
    for line in (
        "residual = hidden_states",
        "hidden_states = self.input_layernorm(hidden_states)",
        "hidden_states, _ = self.self_attn(...)",
        "hidden_states = residual + hidden_states",
        "residual = hidden_states",
        "hidden_states = self.post_attention_layernorm(hidden_states)",
        "hidden_states = self.mlp(hidden_states)",
        "hidden_states = residual + hidden_states",
        "return hidden_states",
    )
]


@dataclass(frozen=True)
class AttentionCall:
    """The arguments a pre-norm layer's forward hands its attention, as names of the forward's own
    parameters (``hidden_states`` standing for the normed input)."""

    signature: inspect.Signature  # the forward's, self included
    positional: tuple[str, ...]
    keywords: tuple[tuple[str, str], ...]  # (keyword, parameter)
    passes_kwargs: str | None  # the ``**kwargs`` parameter handed on whole, if it is
    decorators: tuple = ()  # the original's ``deprecate_kwarg`` decorators, outermost first

    def arguments(self, layer, hidden_states, args, kwargs, normed) -> tuple[list, dict]:
        """What the original forward, called as ``(layer, hidden_states, *args, **kwargs)``, passes
        to ``self_attn`` (its defaults filled in as the original's are), with ``normed`` as its input."""
        bound = self.signature.bind(layer, hidden_states, *args, **kwargs)
        bound.apply_defaults()
        values = {**bound.arguments, HIDDEN: normed}
        keywords = {keyword: values[name] for keyword, name in self.keywords}
        if self.passes_kwargs is not None:
            repeated = keywords.keys() & values[self.passes_kwargs].keys()
            if repeated:
                raise TypeError(f"self_attn() got multiple values for keyword argument '{min(repeated)}'")
            keywords.update(values[self.passes_kwargs])
        return [values[name] for name in self.positional], keywords


def _statements(function: ast.FunctionDef) -> list[ast.stmt]:
    """The body without docstrings and other bare constants."""
    return [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]


def _code_line(node: ast.AST) -> str:
    text = ast.unparse(node).splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def _attention_call(statement: ast.stmt, function: ast.FunctionDef) -> tuple | str:
    """(positional, keywords, passes_kwargs) of ``hidden_states, _ = self.self_attn(...)``, or why not."""
    targets = statement.targets if isinstance(statement, ast.Assign) else []
    unpacked = len(targets) == 1 and isinstance(targets[0], ast.Tuple) and len(targets[0].elts) == 2
    call = statement.value if isinstance(statement, ast.Assign) else None
    if not (
        unpacked
        and all(isinstance(t, ast.Name) for t in targets[0].elts)
        and targets[0].elts[0].id == HIDDEN
        and targets[0].elts[1].id not in (HIDDEN, RESIDUAL)
        and isinstance(call, ast.Call)
        and ast.unparse(call.func) == "self.self_attn"
    ):
        return "the attention is not called as `hidden_states, _ = self.self_attn(...)`"
    params = function.args
    names = {a.arg for a in params.posonlyargs + params.args + params.kwonlyargs}
    names -= {params.args[0].arg, RESIDUAL} if params.args else {RESIDUAL}
    passed = [*call.args, *(k.value for k in call.keywords if k.arg is not None)]
    if params.vararg is not None or not all(isinstance(a, ast.Name) and a.id in names for a in passed):
        return "its attention gets more than the forward's own arguments"
    spread = [k.value for k in call.keywords if k.arg is None]
    if spread and not (params.kwarg and len(spread) == 1 and getattr(spread[0], "id", None) == params.kwarg.arg):
        return "its attention gets more than the forward's own arguments"
    positional = tuple(a.id for a in call.args)
    keywords = tuple((k.arg, k.value.id) for k in call.keywords if k.arg is not None)
    return positional, keywords, params.kwarg.arg if spread else None


def _decorators(definition: ast.FunctionDef, function) -> tuple | str:
    """The original's decorators that the fused forward must wear too, outermost first; or why not."""
    found = []
    for node in definition.decorator_list:
        call = node if isinstance(node, ast.Call) else None
        name = ast.unparse(node.func if call else node)
        if name == "auto_docstring":
            continue
        if name != "deprecate_kwarg" or call is None:
            return f"{function.__qualname__} has the decorator `@{_code_line(node)}`"
        try:
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except ValueError:
            return f"{function.__qualname__} has the decorator `@{_code_line(node)}`"
        found.append(function.__globals__[name](*args, **kwargs))
    return tuple(found)


@functools.cache
def read(forward) -> AttentionCall | str:
    """The attention call of a pre-norm decoder layer's ``forward``, or why it is not one (one line)."""
    function = inspect.unwrap(forward)
    name = getattr(function, "__qualname__", repr(function))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return f"the source of {name} cannot be read"
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef) or len(definition.args.args) < 2:
        return f"{name} is not a method taking hidden_states"
    if definition.args.args[1].arg != HIDDEN:
        return f"{name} takes {definition.args.args[1].arg}, not {HIDDEN}"
    decorators = _decorators(definition, function)
    if isinstance(decorators, str):
        return decorators
    statements = _statements(definition)
    found = None
    for i, expected in enumerate(PATTERN):
        if i >= len(statements):
            return f"{name} ends where a pre-norm layer has `{_code_line(expected)}`"
        if i == ATTENTION_AT:
            found = _attention_call(statements[i], definition)
            if isinstance(found, str):
                return f"{name}: {found}"
        elif ast.dump(statements[i]) != ast.dump(expected):
            return f"{name} has `{_code_line(statements[i])}` where a pre-norm layer has `{_code_line(expected)}`"
    if len(statements) > len(PATTERN):
        return f"{name} goes on after `return hidden_states`"
    positional, keywords, passes_kwargs = found
    return AttentionCall(inspect.signature(function), positional, keywords, passes_kwargs, decorators)
