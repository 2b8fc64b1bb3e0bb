"""Top-level C declarations in preprocessed text: scan, split, clean, analyse, write back.

The reading half of :mod:`nativereload.cdefgen`. ``cc -E -dD`` output is
tokenised with its line markers (which file each token came from, and
whether that file is a system header) and its ``#define``/``#undef`` lines;
split into top-level declarations (a function definition's body is
skipped); cleaned of what cffi's parser does not know (attributes,
``__asm__`` labels, ``__extension__``, ``__restrict``, ``inline``); and each
declaration is analysed: what it declares (typedef, function, variable,
struct/union/enum tag) and what it uses (typedef names; struct tags, and
whether by value). The analysis is token-level, not a C parser: cffi's parse
of the result has the last word.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

__all__ = ["KEYWORDS", "Decl", "analyze", "clean", "is_ident", "join", "lex", "opaque", "scan", "skip_balanced",
           "split", "split_commas", "strip_calls"]

KEYWORDS = frozenset("""
auto break case char const continue default do double else enum extern float for goto if inline int long register
restrict return short signed sizeof static struct switch typedef union unsigned void volatile while _Alignas _Alignof
_Atomic _Bool _Complex _Generic _Imaginary _Noreturn _Static_assert _Thread_local
""".split())
_STORAGE = frozenset({"typedef", "extern", "static", "auto", "register"})
_QUALIFIERS = frozenset({"const", "volatile"})
_BASIC_TYPES = frozenset({"void", "char", "short", "int", "long", "float", "double", "signed", "unsigned", "_Bool",
                          "_Complex"})
# Spellings the compiler accepts that cffi's parser does not: removed, or renamed to the standard word.
_REMOVED_WORDS = frozenset({"__extension__", "__restrict", "__restrict__", "restrict", "inline", "__inline",
                            "__inline__", "_Noreturn", "noreturn", "__unaligned", "_Nullable", "_Nonnull",
                            "_Null_unspecified", "__nullable", "__nonnull"})
_RENAMED_WORDS = {"__const": "const", "__const__": "const", "__volatile": "volatile", "__volatile__": "volatile",
                  "__signed": "signed", "__signed__": "signed"}
# Words followed by a parenthesised argument that goes with them.
_REMOVED_CALLS = frozenset({"__attribute__", "__attribute", "__declspec", "__asm__", "__asm", "asm", "_Alignas",
                            "alignas"})
# Declarations using one of these are dropped: cffi has no such type (or cannot call through it).
_UNSUPPORTED = {
    "__builtin_va_list": "va_list (cffi cannot pass one)", "__int128": "__int128", "__int128_t": "__int128",
    "__uint128_t": "__int128", "_Float16": "_Float16", "_Float32": "_Float32", "_Float64": "_Float64",
    "_Float128": "_Float128", "_Float32x": "_Float32x", "_Float64x": "_Float64x", "_Float128x": "_Float128x",
    "__float128": "__float128", "__float80": "__float80", "__ibm128": "__ibm128", "__bf16": "__bf16",
    "_Decimal32": "_Decimal32", "_Decimal64": "_Decimal64", "_Decimal128": "_Decimal128",
    "_Atomic": "_Atomic", "__typeof__": "typeof", "__typeof": "typeof", "typeof": "typeof",
    "__auto_type": "__auto_type", "_Thread_local": "a thread-local variable", "__thread": "a thread-local variable",
}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<ident>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<number>\.?[0-9](?:[eEpP][+-]|[A-Za-z0-9_.'])*)
  | (?P<string>"(?:\\.|[^"\\\n])*")
  | (?P<char>'(?:\\.|[^'\\\n])*')
  | (?P<punct>\.\.\.|<<=|>>=|->|\+\+|--|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^]=|\#\#|[{}\[\]();:,.<>=!~?*/%+\-&|^\#])
  | (?P<other>.)
""", re.X | re.S)
_LINE_MARKER = re.compile(r'#\s*(?:line\s+)?(\d+)\s+"((?:\\.|[^"\\])*)"((?:\s+\d)*)')
_DEFINE = re.compile(r"#\s*define\s+([A-Za-z_][A-Za-z0-9_]*)(\()?(.*)$", re.S)
_UNDEF = re.compile(r"#\s*undef\s+([A-Za-z_][A-Za-z0-9_]*)")


@dataclasses.dataclass
class Decl:
    """One top-level declaration (or function definition) of the preprocessed text."""

    tokens: list
    file: str
    index: int
    body: bool = False                  # a function definition: tokens are its header, without the body
    macro: tuple[str, int] | None = None   # (name, value) for a "#define NAME VALUE" pseudo-declaration
    kind: str = ""                      # typedef, function, variable, type, other
    names: tuple[str, ...] = ()         # identifiers it declares
    tags: tuple[str, ...] = ()          # "struct X" it defines with a body
    layout_names: tuple[str, ...] = ()  # how to name the struct it defines in C ("struct X" or a typedef name)
    refs: frozenset = frozenset()       # identifiers it uses
    tag_refs: frozenset = frozenset()   # "struct X" it needs complete (used by value)
    tag_mentions: frozenset = frozenset()   # every "struct X" it names
    storage: frozenset = frozenset()
    inline: bool = False
    drop: str | None = None             # why it is left out
    cause: str | None = None            # the first reason in a chain of "needs X" drops
    note: str | None = None             # a comment to print above it

    def label(self) -> str:
        if self.macro:
            return self.macro[0]
        return (self.names or self.tags or ("declaration",))[0]


# --------------------------------------------------------------------------- reading the preprocessed text

def scan(text: str) -> tuple[list[tuple[str, str]], list[tuple[int, str, str, list[str] | None]], list[str],
                              set[str]]:
    """Tokens with their file, the macro definitions (position, file, name, body or None for #undef), the
    files read, and which of them are system headers (GCC's line-marker flag 3)."""
    tokens: list[tuple[str, str]] = []
    macros: list[tuple[int, str, str, list[str] | None]] = []
    files: dict[str, None] = {}
    system: set[str] = set()
    current = ""
    pending = ""
    for line in text.split("\n"):
        if pending:
            line, pending = pending + line, ""
        stripped = line.lstrip()
        if stripped.startswith("#"):
            if stripped.endswith("\\"):
                pending = stripped[:-1]
                continue
            marker = _LINE_MARKER.match(stripped)
            if marker:
                current = marker.group(2).encode().decode("unicode_escape") if "\\" in marker.group(2) \
                    else marker.group(2)
                if not current.startswith("<"):
                    files.setdefault(current)
                if "3" in marker.group(3).split():
                    system.add(current)
                continue
            define = _DEFINE.match(stripped)
            if define:
                # Function-like macros (NAME immediately followed by "(") have no value of their own.
                body = None if define.group(2) else lex(define.group(3))
                if body is not None:
                    macros.append((len(tokens), current, define.group(1), body))
                continue
            undef = _UNDEF.match(stripped)
            if undef:
                macros.append((len(tokens), current, undef.group(1), None))
            continue   # #pragma, #ident: nothing for cffi
        for token in lex(line):
            tokens.append((token, current))
    return tokens, macros, list(files), system


def lex(text: str) -> list[str]:
    return [m.group() for m in _TOKEN.finditer(text) if m.lastgroup != "space"]


def skip_balanced(tokens: Sequence, start: int) -> int:
    """Index after the bracket group opening at ``start``."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth = 0
    for i in range(start, len(tokens)):
        t = tokens[i]
        if t in pairs:
            depth += 1
        elif t in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return i + 1
    return len(tokens)


def strip_calls(tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove ``__attribute__((...))``, ``__asm__("...")``, ``_Alignas(...)`` and the like with their arguments."""
    out = []
    i = 0
    n = len(tokens)
    while i < n:
        t = tokens[i][0]
        if t in _REMOVED_CALLS:
            j = i + 1
            while j < n and tokens[j][0] in ("volatile", "__volatile__", "goto", "inline"):
                j += 1   # asm qualifiers
            if j < n and tokens[j][0] == "(":
                i = after_group(tokens, j)
                continue
        out.append(tokens[i])
        i += 1
    return out


def after_group(tokens: list[tuple[str, str]], start: int) -> int:
    depth = 0
    for i in range(start, len(tokens)):
        t = tokens[i][0]
        if t in ("(", "[", "{"):
            depth += 1
        elif t in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return i + 1
    return len(tokens)


def split(tokens: list[tuple[str, str]]) -> list[Decl]:
    """Top-level declarations, each ending at ";", and function definitions (body skipped)."""
    decls: list[Decl] = []
    current: list[str] = []
    file = ""
    depth = 0
    body_start = -1   # depth-0 index in ``current`` where a function body began
    has_equals = False
    for index, (t, f) in enumerate(tokens):
        if not current:
            file, has_equals, body_start = f, False, -1
        if depth == 0:
            if t == ";":
                if current:
                    decls.append(Decl(current, file, index))
                current = []
                continue
            if t == "=":
                has_equals = True
            elif t == "{" and current and current[-1] == ")" and not has_equals:
                body_start = len(current)
        if t in ("(", "[", "{"):
            depth += 1
        elif t in (")", "]", "}"):
            depth -= 1
        current.append(t)
        if depth == 0 and t == "}" and body_start >= 0:
            decls.append(Decl(current[:body_start], file, index, body=True))
            current = []
    return decls


# --------------------------------------------------------------------------- understanding one declaration

def is_ident(t: str) -> bool:
    return t[:1].isalpha() or t[:1] == "_" or t[:1] == "$"


def clean(decl: Decl) -> None:
    """Remove what cffi cannot parse (in place), or set ``decl.drop``."""
    tokens = []
    for t in decl.tokens:
        if t in _UNSUPPORTED and decl.drop is None:
            decl.drop = f"uses {_UNSUPPORTED[t]}"
        if t in ("inline", "__inline", "__inline__"):
            decl.inline = True
        if t in _REMOVED_WORDS:
            continue
        tokens.append(_RENAMED_WORDS.get(t, t))
    decl.tokens = tokens
    if not tokens:
        decl.drop = "empty"
    elif decl.drop:
        pass
    elif tokens[0] in ("_Static_assert", "static_assert"):
        decl.drop = "a static assertion"


def analyze(decl: Decl, typedef_names: set[str]) -> None:
    """Fill in kind, names, tags, refs and tag_refs from the tokens."""
    toks = decl.tokens
    n = len(toks)
    i = 0
    storage = set()
    saw_type = False
    tags = []
    layout = []
    anonymous_body = False
    while i < n:
        t = toks[i]
        if t in _STORAGE:
            storage.add(t)
        elif t in _QUALIFIERS:
            pass
        elif t in _BASIC_TYPES:
            saw_type = True
        elif t in ("struct", "union", "enum"):
            saw_type = True
            tag = None
            if i + 1 < n and is_ident(toks[i + 1]) and toks[i + 1] not in KEYWORDS:
                tag = f"{t} {toks[i + 1]}"
                i += 1
            if i + 1 < n and toks[i + 1] == "{":
                end = skip_balanced(toks, i + 1)
                if tag:
                    tags.append(tag)
                    if t != "enum":
                        layout.append(tag)
                elif t != "enum":
                    anonymous_body = True
                i = end
                continue
        elif is_ident(t) and not saw_type and t not in KEYWORDS:
            saw_type = True   # a typedef name
        else:
            break
        i += 1
    names = []
    is_function = False
    for declarator in split_commas(toks[i:]):
        for j, t in enumerate(declarator):
            if t == "=":
                break
            if is_ident(t) and t not in KEYWORDS:
                names.append(t)
                if j + 1 < len(declarator) and declarator[j + 1] == "(":
                    is_function = True
                break
    if "typedef" in storage:
        kind = "typedef"
        if anonymous_body and names:
            layout.append(names[0])
    elif is_function:
        kind = "function"
    elif names:
        kind = "variable"
    else:
        kind = "type"
    decl.kind = kind
    decl.names = tuple(names)
    decl.tags = tuple(tags)
    decl.layout_names = tuple(layout)
    decl.storage = frozenset(storage)
    own = set(names)
    decl.refs = frozenset(t for t in toks if t in typedef_names and t not in own) if typedef_names else frozenset()
    by_value = set()
    mentions = set()
    for j in range(len(toks) - 1):
        if toks[j] in ("struct", "union", "enum") and is_ident(toks[j + 1]):
            follower = toks[j + 2] if j + 2 < len(toks) else ";"
            tag = f"{toks[j]} {toks[j + 1]}"
            if tag not in tags:
                mentions.add(tag)
                if follower not in ("*", "{"):
                    by_value.add(tag)
    decl.tag_refs = frozenset(by_value)
    decl.tag_mentions = frozenset(mentions)


def split_commas(tokens: Sequence[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    depth = 0
    for t in tokens:
        if t in ("(", "[", "{"):
            depth += 1
        elif t in (")", "]", "}"):
            depth -= 1
        if t == "," and depth == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return [p for p in parts if p]


# --------------------------------------------------------------------------- writing declarations back

def join(tokens: Iterable) -> str:
    out: list[str] = []
    prev = ""
    for t in tokens:
        t = t if isinstance(t, str) else str(t.value)   # a computed constant (cdefgen._Query)
        if out and _space_between(prev, t):
            out.append(" ")
        out.append(t)
        prev = t
    return "".join(out)


def _space_between(prev: str, t: str) -> bool:
    if t in (",", ";", ")", "]", "["):
        return False
    if prev in ("(", "[", "~", "!"):
        return False
    if t == "(" and (prev == ")" or (is_ident(prev) and prev not in KEYWORDS)):
        return False
    if prev == "*" and t not in _QUALIFIERS and (is_ident(t) or t in ("*", ")", "(")):
        return False
    return True


def opaque(decl: Decl) -> list:
    """The declaration with its struct body removed (an anonymous struct gets its typedef name as tag)."""
    toks = decl.tokens
    for i, t in enumerate(toks):
        if t in ("struct", "union") :
            j = i + 1
            tag: list = []
            if j < len(toks) and is_ident(toks[j]) and toks[j] not in KEYWORDS:
                tag = [toks[j]]
                j += 1
            if j < len(toks) and toks[j] == "{":
                end = skip_balanced(toks, j)
                if not tag and decl.names:
                    tag = [decl.names[0]]
                return toks[:i + 1] + tag + toks[end:]
    return toks
