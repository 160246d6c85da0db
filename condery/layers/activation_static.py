"""A static evaluator of a safe subset of POSIX sh: activation scripts where no sandbox
can run them (layers/activation.py falls back to it when bwrap is unusable).

It runs nothing. It understands what most activation scripts are made of, and refuses
(names the construct) everything else:

- comments, `;`, newlines, `&&`, `||`, `!`, and `if ... then ... elif ... else ... fi`;
- assignments (`NAME=word`), `export NAME=word`, `export NAME`, `unset NAME`, `:`,
  `true`, `false`, `echo` and `printf` without redirections (their output is dropped);
- `[ ... ]` and `test ...` with `-n -z -d -f -e = == !=`, `!`, or one word; a path test
  answers from the probes (the image's paths the scripts name); a path outside the
  environment is refused (the container's files are not known at build time);
- words with '...' and "..." quoting, backslash escapes, `$NAME`, `${NAME}`,
  `${NAME:-w}`, `${NAME-w}`, `${NAME:+w}`, `${NAME+w}`; an unquoted expansion that would
  be split or globbed is refused.

Refused: command substitution, arithmetic, pipes, redirections, `case`, loops,
functions, `.`/`source`, `[[`, `$HOME`/`$USER`/`$PWD`/... (they depend on the container),
positional and special parameters, any other command. A refused script is not static;
the others still are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_ASSIGNMENT = re.compile(rf"^({_NAME})=")
_CONTAINER_DEPENDENT = frozenset({"HOME", "USER", "LOGNAME", "UID", "EUID", "HOSTNAME", "PWD", "OLDPWD", "PPID",
                                  "RANDOM", "SECONDS", "LINENO", "SHLVL", "TERM"})
_RESERVED = frozenset({"if", "then", "elif", "else", "fi"})
_REFUSED_WORDS = frozenset({"case", "esac", "for", "while", "until", "do", "done", "function", "{", "}", "select"})


class Refused(Exception):
    """The script leaves the subset: the message names what."""


# A word is a list of parts: ("lit", text) unquoted, ("q", text) quoted, ("var", expr, quoted).
Word = list


@dataclass
class _Token:
    kind: str  # "word" or "op" ("\n", ";", "&&", "||")
    value: object


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(text)
    word: Word = []
    in_word = False

    def end_word() -> None:
        nonlocal word, in_word
        if in_word:
            out.append(_Token("word", word))
        word, in_word = [], False

    while i < n:
        c = text[i]
        if c in " \t":
            end_word()
            i += 1
        elif c == "\\" and i + 1 < n and text[i + 1] == "\n":
            i += 2
        elif c == "#" and not in_word:
            while i < n and text[i] != "\n":
                i += 1
        elif c in "\n;":
            end_word()
            if c == ";" and text[i:i + 2] == ";;":
                raise Refused("case")
            out.append(_Token("op", c))
            i += 1
        elif text.startswith("&&", i) or text.startswith("||", i):
            end_word()
            out.append(_Token("op", text[i:i + 2]))
            i += 2
        elif c in "|&<>()`":
            raise Refused({"|": "a pipe", "&": "a background command", "<": "a redirection", ">": "a redirection",
                           "(": "a subshell or function", ")": "a subshell or function",
                           "`": "command substitution"}[c])
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise Refused("an unterminated quote")
            word.append(("q", text[i + 1:j]))
            in_word = True
            i = j + 1
        elif c == '"':
            i = _double_quoted(text, i + 1, word)
            in_word = True
        elif c == "\\":
            if i + 1 >= n:
                raise Refused("a trailing backslash")
            word.append(("q", text[i + 1]))
            in_word = True
            i += 2
        elif c == "$":
            i = _dollar(text, i, word, quoted=False)
            in_word = True
        else:
            j = i
            while j < n and text[j] not in " \t\n;&|<>()`'\"\\$":
                j += 1
            word.append(("lit", text[i:j]))
            in_word = True
            i = j
    end_word()
    return out


def _double_quoted(text: str, i: int, word: Word) -> int:
    buf = []
    while True:
        if i >= len(text):
            raise Refused("an unterminated quote")
        c = text[i]
        if c == '"':
            word.append(("q", "".join(buf)))
            return i + 1
        if c == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\\n':
            if text[i + 1] != "\n":
                buf.append(text[i + 1])
            i += 2
        elif c == "`":
            raise Refused("command substitution")
        elif c == "$":
            word.append(("q", "".join(buf)))
            buf = []
            i = _dollar(text, i, word, quoted=True)
        else:
            buf.append(c)
            i += 1


def _dollar(text: str, i: int, word: Word, quoted: bool) -> int:
    rest = text[i + 1:]
    if rest.startswith("(("):
        raise Refused("arithmetic")
    if rest.startswith("("):
        raise Refused("command substitution")
    if rest.startswith("{"):
        depth, j = 1, i + 2
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth:
            raise Refused("an unterminated ${")
        word.append(("var", text[i + 2:j - 1], quoted))
        return j
    match = re.match(_NAME, rest)
    if match:
        word.append(("var", match.group(0), quoted))
        return i + 1 + match.end()
    if rest[:1] and rest[0] in "0123456789@*#?$!-":
        raise Refused(f"the special parameter ${rest[0]}")
    word.append(("q" if quoted else "lit", "$"))
    return i + 1


def _is_glob(text: str) -> bool:
    return "*" in text or "?" in text or re.search(r"\[.*\]", text) is not None


class _Shell:
    def __init__(self, env: Mapping[str, str], probes: Sequence[tuple[str, str]], prefix: str) -> None:
        self.vars: dict[str, str] = dict(env)
        self.exported: set[str] = set(env)
        self.probes = {rel: kind for kind, rel in probes}
        self.prefix = prefix

    # -- expansion
    def _param(self, expr: str, quoted: bool) -> str:
        match = re.fullmatch(rf"({_NAME})(?:(:?[-+])(.*))?", expr, re.DOTALL)
        if not match:
            raise Refused(f"the expansion ${{{expr}}}")
        name, op, arg = match.groups()
        if name in _CONTAINER_DEPENDENT:
            raise Refused(f"${name}, which depends on the container")
        value = self.vars.get(name)
        if op is None:
            return value or ""
        is_set = value is not None and (value != "" or not op.startswith(":"))
        if op.endswith("-"):
            return value if is_set else self._expand_text(arg)  # type: ignore[return-value]
        return self._expand_text(arg) if is_set else ""

    def _expand_text(self, text: str) -> str:
        """The word of ${NAME:-word}: itself expanded (quotes and $ inside)."""
        if not text:
            return ""
        toks = _tokens(text.replace(" ", "\\ "))
        if len(toks) != 1 or toks[0].kind != "word":
            raise Refused(f"the expansion word {text!r}")
        return self.expand(toks[0].value, split=False)  # type: ignore[arg-type]

    def expand(self, word: Word, split: bool = True) -> str | None:
        """The word's one field; None when it is an unquoted empty expansion (no field)."""
        out, quoted_any = [], False
        for part in word:
            if part[0] == "lit":
                if split and _is_glob(part[1]):
                    raise Refused(f"a glob pattern ({part[1]})")
                out.append(part[1])
            elif part[0] == "q":
                out.append(part[1])
                quoted_any = True
            else:
                value = self._param(part[1], part[2])
                if not part[2] and split and (any(ch in value for ch in " \t\n") or _is_glob(value)):
                    raise Refused(f"an unquoted ${part[1]} that would be split or globbed")
                out.append(value)
                quoted_any = quoted_any or part[2]
        text = "".join(out)
        if split and not text and not quoted_any:
            return None
        return text

    # -- commands
    def simple(self, words: list[Word]) -> int:
        fields_assign = []
        rest = list(words)
        while rest and rest[0] and rest[0][0][0] == "lit" and _ASSIGNMENT.match(rest[0][0][1]):
            fields_assign.append(rest.pop(0))
        if fields_assign and rest:
            raise Refused("an assignment before a command")
        for word in fields_assign:
            self._assign(word, export=False)
        if not rest:
            return 0
        first = self.expand(rest[0])
        if first == "export":
            for word in rest[1:]:
                if self._is_assignment(word):
                    self._assign(word, export=True)
                else:
                    name = self.expand(word)
                    if name is None:
                        continue
                    if not re.fullmatch(_NAME, name):
                        # export "NAME=value" (proj's script): quoted as a whole
                        m = re.fullmatch(rf"({_NAME})=(.*)", name, re.DOTALL)
                        if not m:
                            raise Refused(f"export {name}")
                        self.vars[m.group(1)] = m.group(2)
                        self.exported.add(m.group(1))
                    else:
                        self.exported.add(name)
            return 0
        args = [a for a in (self.expand(w) for w in rest[1:]) if a is not None]
        if first == "unset":
            for name in args:
                if name in ("-v",):
                    continue
                if not re.fullmatch(_NAME, name):
                    raise Refused(f"unset {name}")
                self.vars.pop(name, None)
                self.exported.discard(name)
            return 0
        if first in (":", "true"):
            return 0
        if first == "false":
            return 1
        if first in ("echo", "printf"):
            return 0
        if first in ("[", "test"):
            if first == "[":
                if not args or args[-1] != "]":
                    raise Refused("[ without ]")
                args = args[:-1]
            return self._test(args)
        raise Refused(f"the command {first}")

    @staticmethod
    def _is_assignment(word: Word) -> bool:
        return bool(word) and word[0][0] == "lit" and bool(_ASSIGNMENT.match(word[0][1]))

    def _assign(self, word: Word, export: bool) -> None:
        match = _ASSIGNMENT.match(word[0][1])
        assert match
        name = match.group(1)
        value_word = [("lit", word[0][1][match.end():]), *word[1:]]
        value = self.expand(value_word, split=False) or ""
        if name in _CONTAINER_DEPENDENT:
            raise Refused(f"setting ${name}")
        self.vars[name] = value
        if export:
            self.exported.add(name)

    def _test(self, args: list[str]) -> int:
        negate = False
        if args and args[0] == "!" and len(args) > 1:
            negate, args = True, args[1:]
        if len(args) == 0:
            result = False
        elif len(args) == 1:
            result = args[0] != ""
        elif len(args) == 2 and args[0] in ("-n", "-z"):
            result = (args[1] != "") == (args[0] == "-n")
        elif len(args) == 2 and args[0] in ("-d", "-f", "-e"):
            result = self._path_test(args[0], args[1])
        elif len(args) == 3 and args[1] in ("=", "==", "!="):
            result = (args[0] == args[2]) == (args[1] != "!=")
        else:
            raise Refused(f"the test [ {' '.join(args)} ]")
        return 0 if result != negate else 1

    def _path_test(self, op: str, path: str) -> bool:
        if path == "":
            return False
        if path == self.prefix:
            return op in ("-d", "-e")
        if not path.startswith(self.prefix + "/"):
            raise Refused(f"a test of {path}, outside the environment")
        rel = path[len(self.prefix) + 1:].rstrip("/")
        kind = self.probes.get(rel)
        return kind is not None and (op == "-e" or (op == "-d") == (kind == "d"))


# -- parsing: a list of and-or lists, with if-blocks

@dataclass
class _If:
    branches: list  # [(condition, body)], else as (None, body)


def _parse(tokens: list[_Token]) -> list:
    pos = 0

    def word_value(t: _Token) -> str | None:
        if t.kind == "word" and len(t.value) == 1 and t.value[0][0] == "lit":  # type: ignore[arg-type]
            return t.value[0][1]  # type: ignore[index]
        return None

    def parse_list(stops: frozenset[str]) -> list:
        nonlocal pos
        items = []
        while pos < len(tokens):
            t = tokens[pos]
            if t.kind == "op" and t.value in ("\n", ";"):
                pos += 1
                continue
            if word_value(t) in stops:
                return items
            items.append(parse_and_or())
        if stops:
            raise Refused(f"an if without {'/'.join(sorted(stops))}")
        return items

    def parse_and_or() -> list:
        nonlocal pos
        chain = [("", parse_pipeline())]
        while pos < len(tokens) and tokens[pos].kind == "op" and tokens[pos].value in ("&&", "||"):
            op = tokens[pos].value
            pos += 1
            while pos < len(tokens) and tokens[pos].kind == "op" and tokens[pos].value == "\n":
                pos += 1
            chain.append((op, parse_pipeline()))
        return chain

    def parse_pipeline() -> tuple:
        nonlocal pos
        negate = False
        if pos < len(tokens) and word_value(tokens[pos]) == "!":
            negate = True
            pos += 1
        if pos < len(tokens) and word_value(tokens[pos]) == "if":
            pos += 1
            return (negate, parse_if())
        words = []
        while pos < len(tokens) and tokens[pos].kind == "word":
            value = word_value(tokens[pos])
            if not words and value in _REFUSED_WORDS:
                raise Refused(value)
            if not words and value in _RESERVED:
                raise Refused(f"a misplaced {value}")
            if not words and value is not None and value.endswith("()"):
                raise Refused("a function")
            words.append(tokens[pos].value)
            pos += 1
        if not words:
            raise Refused("an empty command")
        return (negate, words)

    def parse_if() -> _If:
        nonlocal pos
        branches = []
        while True:
            condition = parse_list(frozenset({"then"}))
            pos += 1
            body = parse_list(frozenset({"elif", "else", "fi"}))
            branches.append((condition, body))
            keyword = word_value(tokens[pos])
            pos += 1
            if keyword == "elif":
                continue
            if keyword == "else":
                branches.append((None, parse_list(frozenset({"fi"}))))
                pos += 1
            return _If(branches)

    return parse_list(frozenset())


def _run_list(shell: _Shell, items: list) -> int:
    status = 0
    for chain in items:
        status = _run_and_or(shell, chain)
    return status


def _run_and_or(shell: _Shell, chain: list) -> int:
    status = 0
    for op, (negate, node) in chain:
        if op == "&&" and status != 0:
            continue
        if op == "||" and status == 0:
            continue
        status = _run_node(shell, node)
        if negate:
            status = 0 if status else 1
    return status


def _run_node(shell: _Shell, node: object) -> int:
    if isinstance(node, _If):
        for condition, body in node.branches:
            if condition is None or _run_list(shell, condition) == 0:
                return _run_list(shell, body)
        return 0
    return shell.simple(node)  # type: ignore[arg-type]


def run_static(scripts: Sequence[tuple[str, str]], start: Mapping[str, str],
               probes: Sequence[tuple[str, str]] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """(scripts refused or failing -> why, the exported environment after the others),
    sourcing `scripts` (name, text) in order from `start` (its CONDA_PREFIX is the prefix)."""
    prefix = start["CONDA_PREFIX"]
    shell = _Shell(start, probes, prefix)
    excluded: dict[str, str] = {}
    for name, text in scripts:
        saved_vars, saved_exported = dict(shell.vars), set(shell.exported)
        try:
            status = _run_list(shell, _parse(_tokens(text)))
            if status != 0:
                raise Refused(f"returns status {status}")
        except Refused as exc:
            excluded[name] = str(exc) if str(exc).startswith("returns") else f"uses {exc}, outside the static subset"
            shell.vars, shell.exported = saved_vars, saved_exported
        except RecursionError:
            excluded[name] = "nests too deep"
            shell.vars, shell.exported = saved_vars, saved_exported
    return excluded, {k: v for k, v in shell.vars.items() if k in shell.exported}
