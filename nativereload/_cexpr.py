"""Integer constant expressions of C, evaluated the way an LP64 C compiler does.

``evaluate(tokens, names)`` is used by :mod:`nativereload.cdefgen` for the
values cffi's parser cannot compute itself: ``#define`` bodies such as
``(ZSTD_VERSION_MAJOR*100*100 + ...)`` or ``(0ULL - 1)``, array bounds and
enum values written as expressions. cffi evaluates only literals and
``+ - * / % << >> & | ^`` with Python integers, so ``(0ULL - 1)`` would be -1
for it, not 18446744073709551615: here every value carries its C type
(32 or 64 bits, signed or not) and arithmetic wraps as C's does.

Anything that is not a constant this module can prove (``sizeof``, a cast to
a pointer, an unknown name, a string) raises :class:`NotConstant`; the caller
then asks the compiler, or leaves the constant out.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Mapping, Sequence

__all__ = ["NotConstant", "evaluate", "parse_int_literal"]

_LONG_BITS = ctypes.sizeof(ctypes.c_long) * 8
_CHAR_SIGNED = ctypes.c_char(b"\xff").value == b"\xff" and ctypes.c_byte(-1).value == -1

# Integer type names a cast may use -> (bits, unsigned).
_INT_TYPES: dict[str, tuple[int, bool]] = {
    "char": (8, not _CHAR_SIGNED), "signed char": (8, False), "unsigned char": (8, True),
    "short": (16, False), "short int": (16, False), "signed short": (16, False),
    "unsigned short": (16, True), "unsigned short int": (16, True),
    "int": (32, False), "signed": (32, False), "signed int": (32, False),
    "unsigned": (32, True), "unsigned int": (32, True),
    "long": (_LONG_BITS, False), "long int": (_LONG_BITS, False), "signed long": (_LONG_BITS, False),
    "unsigned long": (_LONG_BITS, True), "unsigned long int": (_LONG_BITS, True),
    "long long": (64, False), "long long int": (64, False), "signed long long": (64, False),
    "unsigned long long": (64, True), "unsigned long long int": (64, True),
    "_Bool": (8, True), "bool": (8, True),
    "int8_t": (8, False), "int16_t": (16, False), "int32_t": (32, False), "int64_t": (64, False),
    "uint8_t": (8, True), "uint16_t": (16, True), "uint32_t": (32, True), "uint64_t": (64, True),
    "size_t": (_LONG_BITS, True), "ssize_t": (_LONG_BITS, False), "ptrdiff_t": (_LONG_BITS, False),
    "intptr_t": (_LONG_BITS, False), "uintptr_t": (_LONG_BITS, True),
    "intmax_t": (64, False), "uintmax_t": (64, True),
}
_TYPE_WORDS = {"char", "short", "int", "long", "signed", "unsigned", "_Bool", "bool", "const", "volatile"}


class NotConstant(ValueError):
    """The expression is not an integer constant that can be evaluated here."""


def _wrap(value: int, bits: int, unsigned: bool) -> int:
    value &= (1 << bits) - 1
    if not unsigned and value >> (bits - 1):
        value -= 1 << bits
    return value


class _Value:
    __slots__ = ("value", "bits", "unsigned")

    def __init__(self, value: int, bits: int = 32, unsigned: bool = False) -> None:
        self.bits = bits
        self.unsigned = unsigned
        self.value = _wrap(value, bits, unsigned)

    def promoted(self) -> "_Value":
        # Integer promotion: anything narrower than int becomes int.
        return self if self.bits >= 32 else _Value(self.value, 32, False)


def parse_int_literal(text: str) -> _Value:
    """An integer literal (``10``, ``0x1Fu``, ``017``, ``10ULL``) with the type C gives it."""
    body = text.rstrip("uUlL")
    suffix = text[len(body):].lower()
    body = body.replace("'", "")   # C23 digit separators
    try:
        if body[:2].lower() == "0x":
            value, decimal = int(body[2:], 16), False
        elif body[:2].lower() == "0b":
            value, decimal = int(body[2:], 2), False
        elif body.startswith("0") and len(body) > 1:
            value, decimal = int(body[1:], 8), False
        else:
            value, decimal = int(body, 10), True
    except ValueError:
        raise NotConstant(f"not an integer literal: {text}") from None
    unsigned_suffix = "u" in suffix
    longs = suffix.count("l")
    candidates = []   # (bits, unsigned) in C's order for this literal
    for bits in ([32] if longs == 0 else []) + [_LONG_BITS, 64]:
        if unsigned_suffix:
            candidates.append((bits, True))
        else:
            candidates.append((bits, False))
            if not decimal:
                candidates.append((bits, True))
    for bits, unsigned in candidates:
        limit = 1 << (bits if unsigned else bits - 1)
        if value < limit:
            return _Value(value, bits, unsigned)
    raise NotConstant(f"integer literal too large: {text}")


def _char_literal(text: str) -> _Value:
    inner = text[1:-1]
    if not inner.startswith("\\"):
        if len(inner) != 1:
            raise NotConstant(f"multi-character constant {text}")
        return _Value(ord(inner))
    escapes = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39, '"': 34, "a": 7, "b": 8, "f": 12, "v": 11,
               "?": 63}
    rest = inner[1:]
    if rest.startswith("x"):
        return _Value(int(rest[1:], 16) & 0xFF)
    if rest and rest[0] in "01234567":
        return _Value(int(rest, 8) & 0xFF)
    if rest in escapes:
        return _Value(escapes[rest])
    raise NotConstant(f"character constant {text}")


def _common(a: _Value, b: _Value) -> tuple[int, bool]:
    """The usual arithmetic conversions: the (bits, unsigned) both operands take."""
    a, b = a.promoted(), b.promoted()
    if a.bits == b.bits:
        return a.bits, a.unsigned or b.unsigned
    wide, narrow = (a, b) if a.bits > b.bits else (b, a)
    # A wider signed type holds every value of a narrower unsigned one.
    return wide.bits, wide.unsigned


_BINARY_PRECEDENCE = {"||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, ">": 7, "<=": 7,
                      ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10}


class _Parser:
    def __init__(self, tokens: Sequence[str], lookup: Callable[[str], "_Value | None"]) -> None:
        self.tokens = list(tokens)
        self.pos = 0
        self.lookup = lookup

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise NotConstant(f"expected {expected or 'a value'}, found {token or 'the end'}")
        self.pos += 1
        return token

    def expression(self) -> _Value:
        condition = self.binary(1)
        if self.peek() != "?":
            return condition
        self.take("?")
        then = self.expression()
        self.take(":")
        otherwise = self.expression()
        bits, unsigned = _common(then, otherwise)
        chosen = then if condition.value else otherwise
        return _Value(chosen.value, bits, unsigned)

    def binary(self, level: int) -> _Value:
        left = self.unary()
        while True:
            op = self.peek()
            precedence = _BINARY_PRECEDENCE.get(op or "")
            if precedence is None or precedence < level:
                return left
            self.take()
            right = self.binary(precedence + 1)
            left = _apply(op, left, right)

    def unary(self) -> _Value:
        token = self.peek()
        if token in ("-", "+", "~", "!"):
            self.take()
            operand = self.unary().promoted()
            if token == "-":
                return _Value(-operand.value, operand.bits, operand.unsigned)
            if token == "+":
                return operand
            if token == "~":
                return _Value(~operand.value, operand.bits, operand.unsigned)
            return _Value(int(not operand.value))
        if token == "(":
            cast = self.cast_type()
            if cast is not None:
                bits, unsigned = cast
                return _Value(self.unary().value, bits, unsigned)
            self.take("(")
            value = self.expression()
            self.take(")")
            return value
        return self.primary()

    def cast_type(self) -> tuple[int, bool] | None:
        """If a cast to an integer type starts here, consume it and return its type.

        ``(X * Y)`` is a product, ``(unsigned *)`` a cast: a cast's first word
        is a type word. A cast to a typedef name this module does not know
        (``(sqlite3_destructor_type)-1``) is read as a name, which is unknown:
        not a constant either way.
        """
        end = self.pos + 1
        words = []
        while end < len(self.tokens) and self.tokens[end] != ")":
            words.append(self.tokens[end])
            end += 1
        if end >= len(self.tokens) or not words:
            return None
        first = words[0]
        if first not in _TYPE_WORDS and first not in _INT_TYPES and first not in ("struct", "union", "enum", "void",
                                                                                 "float", "double"):
            return None
        if "*" in words:
            raise NotConstant("cast to a pointer")
        name = " ".join(w for w in words if w not in ("const", "volatile"))
        if name not in _INT_TYPES:
            raise NotConstant(f"cast to {name}")
        self.pos = end + 1
        return _INT_TYPES[name]

    def primary(self) -> _Value:
        token = self.take()
        if token[0].isdigit():
            return parse_int_literal(token)
        if token[0] == "'":
            return _char_literal(token)
        if token[0].isalpha() or token[0] == "_":
            if token in ("sizeof", "_Alignof", "__alignof__", "__builtin_offsetof", "offsetof"):
                raise NotConstant(token)
            value = self.lookup(token)
            if value is None:
                raise NotConstant(f"unknown name {token}")
            return value
        raise NotConstant(f"unexpected {token}")


def _apply(op: str, a: _Value, b: _Value) -> _Value:
    if op in ("&&", "||"):
        return _Value(int(bool(a.value) and bool(b.value)) if op == "&&" else int(bool(a.value) or bool(b.value)))
    if op in ("<<", ">>"):
        left = a.promoted()
        if b.value < 0 or b.value >= left.bits:
            raise NotConstant("shift out of range")
        if op == "<<":
            return _Value(left.value << b.value, left.bits, left.unsigned)
        return _Value(left.value >> b.value, left.bits, left.unsigned)
    bits, unsigned = _common(a, b)
    x, y = _wrap(a.value, bits, unsigned), _wrap(b.value, bits, unsigned)
    if op in ("==", "!=", "<", ">", "<=", ">="):
        result = {"==": x == y, "!=": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]
        return _Value(int(result))
    if op in ("/", "%"):
        if y == 0:
            raise NotConstant("division by zero")
        quotient = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)   # C truncates toward zero
        return _Value(quotient if op == "/" else x - quotient * y, bits, unsigned)
    result = {"+": x + y, "-": x - y, "*": x * y, "&": x & y, "|": x | y, "^": x ^ y}[op]
    return _Value(result, bits, unsigned)


def _lookup(names: Mapping[str, Sequence[str] | int], expanding: tuple[str, ...]) -> Callable[[str], _Value | None]:
    def lookup(name: str) -> _Value | None:
        meaning = names.get(name)
        if meaning is None or name in expanding:   # a macro never expands inside itself (C11 6.10.3.4)
            return None
        if isinstance(meaning, int):
            fits_int = -(1 << 31) <= meaning < (1 << 31)
            return _Value(meaning, 32 if fits_int else 64, meaning >= (1 << 63))
        if len(expanding) > 32:
            raise NotConstant(f"{name}: macro expansion too deep")
        inner = _Parser(meaning, _lookup(names, expanding + (name,)))
        value = inner.expression()
        if inner.peek() is not None:
            raise NotConstant(f"{name}: not a single expression")
        return value

    return lookup


def evaluate(tokens: Sequence[str], names: Mapping[str, Sequence[str] | int] | None = None) -> int:
    """The value of the integer constant expression ``tokens``.

    Args:
        names: what identifiers stand for: a token list (an object-like macro's
            body, expanded recursively) or an int (an enum constant).

    Raises:
        NotConstant: it is not an integer constant this evaluator can prove.
    """
    if not tokens:
        raise NotConstant("empty expression")
    parser = _Parser(tokens, _lookup(names or {}, ()))
    result = parser.expression()
    if parser.peek() is not None:
        raise NotConstant(f"unexpected {parser.peek()}")
    return result.value
