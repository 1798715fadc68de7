"""Rendering a checkpoint's chat template (jinja2) with bounded time and memory.

jinja2's immutable sandbox already keeps a template away from Python internals; a hostile template
can still ask for a 10 GB string (`'x' * 10**10`), loop for hours or recurse. Here every call,
filter, operator, attribute lookup and loop step of the template goes through a RenderBudget that
checks the clock (limits.MAX_RENDER_SECONDS), and every operation that can make a large string or
list is sized *before* it runs (limits.MAX_RENDERED_CHARS for one value, MAX_TEMPLATE_WORK_CHARS
for all of them together). The output is produced with `generate()` and capped as it streams.
Nothing here uses signals, so rendering works the same in a worker thread.
"""

from __future__ import annotations

import re
import string
import time
from datetime import date
from functools import wraps

from jinja2 import TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from . import limits
from .errors import MimoError

LOOP_GLOBAL = "__mimo_loop"
CHECK_GLOBAL = "__mimo_checked"
PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
MAX_JSON_INDENT = 16


class TemplateLimit(MimoError):
    """A chat template went over one of the render limits."""


def _size(value) -> int:
    """Rough bytes a value holds: characters of a string, 8 per item of a container."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return 8 * len(value)
    return 0


def _text_size(value) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


class RenderBudget:
    def __init__(self, seconds: float | None = None):
        seconds = limits.MAX_RENDER_SECONDS if seconds is None else seconds
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.work = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"chat template: rendering took over the limit of {self.seconds:g} s")

    def allow(self, size: int, what: str) -> None:
        """Before making a value of about `size` bytes."""
        self.tick()
        if size > limits.MAX_RENDERED_CHARS:
            raise TemplateLimit(f"chat template: {what} would make {size} characters, over the limit of "
                                f"{limits.MAX_RENDERED_CHARS} for one value")
        self.work += size
        if self.work > limits.MAX_TEMPLATE_WORK_CHARS:
            raise TemplateLimit(f"chat template: builds over the limit of {limits.MAX_TEMPLATE_WORK_CHARS} "
                                "characters in one render")

    def made(self, value, what: str):
        """After an operation whose result could not be sized in advance."""
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > limits.MAX_TEMPLATE_INT_BITS:
            raise TemplateLimit(f"chat template: {what} makes an integer over {limits.MAX_TEMPLATE_INT_BITS} bits")
        if _size(value):
            self.allow(_size(value), what)
        return value

    def check_arguments(self, args, kwargs, what: str) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limits.MAX_TEMPLATE_INT_ARGUMENT:
                raise TemplateLimit(f"chat template: {what} called with {value}, over the limit of "
                                    f"{limits.MAX_TEMPLATE_INT_ARGUMENT} for an integer argument")

    def materialize(self, value):
        """A one-shot iterable as a list (checked as it grows), so it can be sized and then used."""
        if isinstance(value, (str, list, tuple, dict)) or not hasattr(value, "__iter__"):
            return value
        items = []
        for item in value:
            items.append(item)
            if len(items) % 4096 == 0:
                self.allow(8 * 4096, "a sequence")
        return items

    def loop(self, iterable):
        return _CountedIterable(iterable, self)


class _CountedIterable:
    """A for loop's iterable: each step checks the clock."""

    def __init__(self, iterable, budget: RenderBudget):
        self.iterable, self.budget = iterable, budget

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        for item in self.iterable:
            self.budget.tick()
            yield item


def _binop_size(op: str, left, right) -> int | None:
    """Size of `left op right` before computing it, for the operators that can blow up."""
    if op == "*":
        for sequence, count in ((left, right), (right, left)):
            if isinstance(count, int) and not isinstance(count, (bool,)) and _size(sequence):
                return _size(sequence) * max(count, 0)
    if op == "+" and _size(left) and _size(right):
        return _size(left) + _size(right)
    if op == "%" and isinstance(left, str):
        _check_percent_format(left)
        arguments = right if isinstance(right, tuple) else (right,)
        return len(left) * (1 + sum(_text_size(a) for a in arguments))
    return None


def _check_int_op(op: str, left, right) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right)):
        return
    if op == "**":
        if right > limits.MAX_TEMPLATE_INT_ARGUMENT or (abs(left) > 1 and left.bit_length() * right > limits.MAX_TEMPLATE_INT_BITS):
            raise TemplateLimit(f"chat template: {left} ** {right} is over the limit of {limits.MAX_TEMPLATE_INT_BITS} bits")
    elif op == "*" and left.bit_length() + right.bit_length() > limits.MAX_TEMPLATE_INT_BITS:
        raise TemplateLimit(f"chat template: a product over the limit of {limits.MAX_TEMPLATE_INT_BITS} bits")


def _check_percent_format(text: str) -> None:
    for match in PERCENT_SPEC.finditer(text):
        for number in match.groups():
            if number == "*" or (number and int(number) > limits.MAX_TEMPLATE_INT_ARGUMENT):
                raise TemplateLimit(f"chat template: format width {number!r} is over the limit of "
                                    f"{limits.MAX_TEMPLATE_INT_ARGUMENT}")


def _format_size(text: str, args, kwargs) -> int:
    """Upper bound of str.format's result: each replacement field holds at most the largest argument."""
    fields = 0
    for _, field, spec, _ in string.Formatter().parse(text):
        if field is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise TemplateLimit("chat template: nested format fields are not allowed")
        for number in re.findall(r"\d+", spec or ""):
            if int(number) > limits.MAX_TEMPLATE_INT_ARGUMENT:
                raise TemplateLimit(f"chat template: format width {number} is over the limit of "
                                    f"{limits.MAX_TEMPLATE_INT_ARGUMENT}")
    largest = max([_text_size(a) for a in (*args, *kwargs.values())] + [0])
    width = max([int(n) for n in re.findall(r"\d+", text)] + [0])
    return len(text) + fields * max(largest, min(width, limits.MAX_TEMPLATE_INT_ARGUMENT))


def _joined_size(separator: str, items: list) -> int:
    return len(separator) * max(len(items) - 1, 0) + sum(_text_size(i) for i in items)


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    if not isinstance(text, str) or not isinstance(old, str) or not isinstance(new, str):
        return 0
    hits = (len(text) + 1) if old == "" else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


class _Bounded(NodeTransformer):
    """Routes every for loop's iterable and every `~` concatenation through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(LOOP_GLOBAL, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return nodes.Call(nodes.Name(CHECK_GLOBAL, "load"), [node], [], None, None, lineno=node.lineno)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    def __init__(self, budget: RenderBudget):
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.budget = budget
        self.globals[LOOP_GLOBAL] = budget.loop
        self.globals[CHECK_GLOBAL] = lambda value: budget.made(value, "a ~ concatenation")
        self.globals["raise_exception"] = _raise_template_error
        self.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context, op: str, left, right):
        _check_int_op(op, left, right)
        size = _binop_size(op, left, right)
        if size is not None:
            self.budget.allow(size, f"'{op}'")
        else:
            self.budget.tick()
        return self.budget.made(self.binop_table[op](left, right), f"'{op}'")

    def getattr(self, obj, attribute):
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.budget.tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        budget = __self.budget
        name = getattr(__obj, "__name__", "a function")
        budget.check_arguments(args, kwargs, name)
        # str.format / format_map come wrapped by the sandbox (the bound method is __wrapped__)
        target = getattr(__obj, "__self__", None) or getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if isinstance(target, str):
            if name == "join" and args:
                args = (budget.materialize(args[0]), *args[1:])
            size = _str_method_size(target, name, args, kwargs)
            if size is not None:
                budget.allow(size, f"str.{name}")
        budget.tick()
        return budget.made(super().call(__context, __obj, *args, **kwargs), name)

    def _bounded_filter(self, name: str, function):
        budget = self.budget
        sizer = FILTER_SIZES.get(name)

        @wraps(function)  # keeps jinja2's pass_context / pass_eval_context marks
        def bounded(*args, **kwargs):
            first = next((i for i, a in enumerate(args) if not _is_jinja_context(a)), len(args))
            if sizer is not None and first < len(args):
                args = (*args[:first], budget.materialize(args[first]), *args[first + 1 :])
            budget.check_arguments(args[first + 1 :], kwargs, f"filter '{name}'")
            if sizer is not None and first < len(args):
                budget.allow(sizer(*args[first:], **kwargs), f"filter '{name}'")
            budget.tick()
            return budget.made(function(*args, **kwargs), f"filter '{name}'")

        return bounded


def _is_jinja_context(value) -> bool:
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(value, (Context, EvalContext, ImmutableSandboxedEnvironment))


def _str_method_size(text: str, name: str, args, kwargs) -> int | None:
    if name in ("format", "format_map"):
        if name == "format_map":
            mapping = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
            return _format_size(text, (), mapping)
        return _format_size(text, args, kwargs)
    if name == "join" and args and isinstance(args[0], (list, tuple, str)):
        return _joined_size(text, args[0])
    if name == "replace" and len(args) >= 2:
        return _replaced_size(text, args[0], args[1], args[2] if len(args) > 2 else -1)
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(text) + text.count("\t") * (tab if isinstance(tab, int) else 8)
    return None


def _indent_size(text, width=4, first=False, blank=False) -> int:
    unit = len(width) if isinstance(width, str) else (width if isinstance(width, int) else 4)
    return _text_size(text) + (str(text).count("\n") + 1) * unit


def _wordwrap_size(text, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True) -> int:
    return _text_size(text) * (1 + len(wrapstring or "\n"))


def _join_filter_size(value, separator="", attribute=None) -> int:
    return _joined_size(separator if isinstance(separator, str) else "", value if isinstance(value, (list, tuple, str)) else [])


def _tojson_size(value, indent=None) -> int:
    if indent is not None and (not isinstance(indent, int) or indent > MAX_JSON_INDENT):
        raise TemplateLimit(f"chat template: tojson indent {indent!r} is over the limit of {MAX_JSON_INDENT}")
    return 0


def _format_filter_size(value, *args, **kwargs) -> int:
    return _binop_size("%", str(value), args or kwargs) or 0


FILTER_SIZES = {
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "join": _join_filter_size,
    "replace": lambda s, old, new, count=None: _replaced_size(str(s), old, new, count if count is not None else -1),
    "tojson": _tojson_size,
    "format": _format_filter_size,
}


def _raise_template_error(message: str):
    raise TemplateError(message)


def render_template(source: str, **variables) -> str:
    """Render `source` with `variables` in the bounded sandbox. Every failure, a template error or
    a limit, is a one-line MimoError."""
    if not isinstance(source, str):
        raise MimoError(f"chat template is {limits.json_type(source)}, not a string")
    if len(source) > limits.MAX_TEMPLATE_CHARS:
        raise TemplateLimit(f"chat template of {len(source)} characters is over the limit of {limits.MAX_TEMPLATE_CHARS}")
    budget = RenderBudget()
    environment = BoundedEnvironment(budget)
    pieces: list[str] = []
    blocks: list[str] = []
    total = 0
    try:
        tree = _Bounded().visit(environment.parse(source))
        tree.set_environment(environment)
        for piece in environment.from_string(tree).generate(**variables):
            total += len(piece)
            if total > limits.MAX_RENDERED_CHARS:
                raise TemplateLimit(f"chat template: the rendered prompt is over the limit of "
                                    f"{limits.MAX_RENDERED_CHARS} characters")
            budget.tick()
            pieces.append(piece)
            if len(pieces) >= 4096:  # many tiny pieces cost far more than their characters
                blocks.append("".join(pieces))
                pieces.clear()
    except MimoError:
        raise
    except RecursionError:
        raise MimoError("chat template failed: recursion too deep") from None
    except MemoryError:
        raise MimoError("chat template failed: out of memory") from None
    except Exception as error:  # a template can raise anything its operations raise
        message = str(error).splitlines()[0] if str(error) else ""
        kind = "" if isinstance(error, TemplateError) else f"{type(error).__name__}: "
        raise MimoError(f"chat template failed: {kind}{message}"[:300]) from None
    return "".join(blocks) + "".join(pieces)

