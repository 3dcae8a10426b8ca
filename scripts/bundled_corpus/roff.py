"""A small deterministic renderer of roff man pages (man macros, tbl) to plain text.

It covers what the Linux man-pages use: headings, tagged and indented paragraphs (.TP, .IP,
.RS/.RE), fill and no-fill (.nf/.EX), font macros, URLs, tbl tables and the common escapes;
everything else is dropped.  Text is filled with ``textwrap`` at 80 columns, body indent 7.

Why not groff (``man -l``)?  Its output is not the same text: it puts two spaces after a
full stop, wraps at 78 columns and adds header and footer lines, so not one of the first 40
pages of manpages-dev came out identical, and the corpus would change.  This renderer is
also independent of the installed groff version.
"""

from __future__ import annotations

import re
import textwrap

from .text import clean_prose

# fmt: off
_ROFF_CHARS = {
    "aq": "'", "dq": "\"", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "bu": "•", "em": "—",
    "en": "–", "ha": "^", "ti": "~", "ga": "`", "rs": "\\", "sc": "§", "mc": "µ", "+-": "±",
    "pl": "+", "mi": "-", "hy": "-", "dg": "†", "co": "©", "rg": "®", "tm": "™", "de": "°",
    "mu": "×", "di": "÷", "->": "→", "<-": "←", ">=": "≥", "<=": "≤", "!=": "≠", "==": "≡",
    "at": "@", "sl": "/", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "or": "|", "ba": "|",
    "ul": "_", "eq": "=", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "ss": "ß", "if": "∞",
    "pi": "π", "aa": "´", "ct": "¢", "Po": "£", "Eu": "€", "ua": "↑", "da": "↓", "ps": "¶",
    "vb": "|", "ap": "~", "ci": "○", "sq": "□", "ts": "s", "R": "®", "Tm": "™",
}
# fmt: on
_NBSP = "\u00a0"  # kept unbreakable while wrapping, turned into a space afterwards
_JOIN = "\x01"  # \c: join with the next text


def _roff_bracketed(s: str, i: int) -> tuple[str, int]:
    """Name after an escape: 'x', '(xx' or '[name]' starting at s[i]."""
    if i >= len(s):
        return "", i
    if s[i] == "(":
        return s[i + 1 : i + 3], i + 3
    if s[i] == "[":
        j = s.find("]", i)
        if j < 0:
            return s[i + 1 :], len(s)
        return s[i + 1 : j], j + 1
    return s[i], i + 1


def roff_escapes(s: str) -> str:
    out = []
    i = 0
    n = len(s)
    while i < n:
        ch = s[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            break
        e = s[i + 1]
        i += 2
        if e == '"':  # comment to end of line
            break
        if e in "\\e":
            out.append("\\")
        elif e == "-":
            out.append("-")
        elif e in "&|^%:/,)":
            pass
        elif e in "~ 0":
            out.append(_NBSP)
        elif e == "c":
            out.append(_JOIN)
        elif e == "t":
            out.append("\t")
        elif e in "'":
            out.append("´")
        elif e == "`":
            out.append("`")
        elif e == ".":
            out.append(".")
        elif e == "f":
            _, i = _roff_bracketed(s, i)
        elif e == "(" or e == "[":
            name, i = _roff_bracketed(s, i - 1)
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                out.append(chr(int(name[1:], 16)))
            else:
                out.append(_ROFF_CHARS.get(name, ""))
        elif e == "*":
            name, i = _roff_bracketed(s, i)
            out.append(_ROFF_CHARS.get(name, ""))
        elif e == "s":
            if i < n and s[i] in "+-":
                i += 1
            if i < n and s[i] in "([":
                _, i = _roff_bracketed(s, i)
            else:
                while i < n and s[i].isdigit():
                    i += 1
        elif e in "nmgk":
            if i < n and s[i] in "+-":
                i += 1
            _, i = _roff_bracketed(s, i)
        elif e in "whvlLoNxbDSXZAR":
            if i < n:
                delim = s[i]
                j = s.find(delim, i + 1)
                i = n if j < 0 else j + 1
        else:
            out.append(e)
    return "".join(out)


def _roff_args(rest: str) -> list[str]:
    args = []
    i = 0
    n = len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            buf = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(rest[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                if rest[j] == "\\" and j + 1 < n:
                    j += 2
                else:
                    j += 1
            args.append(rest[i:j])
            i = j
    return args


def _roff_indent(arg: str | None, default: int) -> int:
    if not arg:
        return default
    m = re.match(r"^([+-]?)(\d+(?:\.\d+)?)([a-z]?)$", arg)
    if not m:
        return default
    value = float(m.group(2))
    if m.group(3) in ("i",):
        value *= 10
    elif m.group(3) in ("m",):
        value *= 2
    return int(-value if m.group(1) == "-" else value)


class ManRenderer:
    WIDTH = 80
    BODY = 7

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.words: list[str] = []
        self.fill = True
        self.base = self.BODY
        self.rs_stack: list[int] = []
        self.extra = 0  # .in
        self.para_indent = 0  # additional indent for TP/IP bodies
        self.pending_tag = False
        self.hang: str | None = None
        self.url: str | None = None
        self.pending_heading: int | None = None

    # output helpers -------------------------------------------------------
    def indent(self) -> int:
        return max(0, self.base + self.extra + self.para_indent)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def emit(self, text: str, indent: int) -> None:
        self.lines.append((" " * indent + text).rstrip())

    def flush(self) -> None:
        if not self.words:
            return
        text = " ".join(self.words).replace(_JOIN, "")
        self.words = []
        ind = self.indent()
        first = " " * ind
        if self.hang is not None:
            tag_ind = max(0, ind - self.BODY)
            if len(self.hang) < self.BODY - 1:
                first = " " * tag_ind + self.hang.ljust(ind - tag_ind)
            else:
                self.emit(self.hang, tag_ind)
            self.hang = None
        wrapped = textwrap.fill(
            text,
            width=self.WIDTH,
            initial_indent=first,
            subsequent_indent=" " * ind,
            break_long_words=False,
            break_on_hyphens=False,
        )
        for line in wrapped.split("\n"):
            self.lines.append(line.rstrip())

    def add_text(self, text: str) -> None:
        if not text.strip() and not self.words:
            return
        if self.pending_heading is not None:
            self.emit(text.replace(_JOIN, "").replace(_NBSP, " ").strip(), self.pending_heading)
            self.pending_heading = None
            return
        if self.pending_tag:
            self.pending_tag = False
            self.drop_hang()
            self.hang = text.replace(_JOIN, "").strip()
            self.para_indent = self.BODY
            return
        if not self.fill:
            self.flush()
            self.drop_hang()
            self.emit(text.replace(_JOIN, ""), self.indent())
            return
        if self.words and self.words[-1].endswith(_JOIN):
            self.words[-1] = self.words[-1][:-1] + text.strip()
        else:
            self.words.append(text.strip())

    def drop_hang(self) -> None:
        """Emit a pending .TP/.IP tag on a line of its own."""
        if self.hang is not None:
            self.emit(self.hang, max(0, self.indent() - self.BODY))
            self.hang = None

    def paragraph(self) -> None:
        self.flush()
        self.drop_hang()
        self.blank()
        self.para_indent = 0

    # macros ------------------------------------------------------------
    FONT_MACROS = ("B", "I", "SM", "SB", "BR", "IR", "RB", "RI", "BI", "IB", "UR", "UE", "MT", "ME")

    def macro(self, name: str, args: list[str]) -> None:
        if name not in self.FONT_MACROS and not (name == "TQ" and self.hang is not None):
            self.flush()
            self.drop_hang()
        if name in ("SH", "SS"):
            self.flush()
            self.pending_tag = False
            self.hang = None
            self.blank()
            title = roff_escapes(" ".join(args)).replace(_JOIN, "").replace(_NBSP, " ")
            if title:
                self.emit(title, 0 if name == "SH" else 3)
            else:
                self.pending_heading = 0 if name == "SH" else 3
            self.base = self.BODY
            self.rs_stack = []
            self.para_indent = 0
            self.extra = 0
        elif name in ("PP", "P", "LP"):
            self.paragraph()
            self.pending_tag = False
        elif name == "TP":
            self.paragraph()
            self.pending_tag = True
        elif name == "TQ":
            self.flush()
            self.drop_hang()
            self.pending_tag = True
        elif name == "IP":
            self.paragraph()
            tag = roff_escapes(args[0]).replace(_JOIN, "") if args else ""
            self.para_indent = self.BODY
            if tag.strip():
                self.hang = tag
        elif name == "HP":
            self.paragraph()
        elif name in ("RS", "INDENT"):
            self.flush()
            self.rs_stack.append(self.base)
            step = _roff_indent(args[0], self.BODY) if args and name == "RS" else self.BODY
            self.base = max(0, self.base + step)
            self.para_indent = 0
        elif name in ("RE", "UNINDENT"):
            self.flush()
            if self.rs_stack:
                self.base = self.rs_stack.pop()
            self.para_indent = 0
        elif name == "in":
            self.flush()
            if not args:
                self.extra = 0
            else:
                arg = args[0]
                value = _roff_indent(arg.lstrip("+-"), 0)
                if arg.startswith("+"):
                    self.extra += value
                elif arg.startswith("-"):
                    self.extra -= value
                else:
                    self.extra = value
        elif name in ("nf", "EX"):
            self.flush()
            self.fill = False
        elif name in ("fi", "EE"):
            self.flush()
            self.fill = True
        elif name == "br":
            self.flush()
        elif name == "sp":
            self.flush()
            self.blank()
        elif name in ("B", "I", "SM", "SB"):
            if args:
                self.add_text(roff_escapes(" ".join(args)))
        elif name in ("BR", "IR", "RB", "RI", "BI", "IB"):
            if args:
                self.add_text(roff_escapes("".join(args)))
        elif name in ("UR", "MT"):
            self.url = args[0] if args else ""
        elif name in ("UE", "ME"):
            if self.url:
                self.add_text(f"<{self.url}>" + (roff_escapes(args[0]) if args else ""))
            elif args:
                self.add_text(roff_escapes(args[0]))
            self.url = None
        # everything else (.TH handled by the caller, .ad, .nh, .PD, .ft, .if, ...) is dropped

    def table(self, rows: list[str]) -> None:
        """Render a tbl(1) block: skip options and format lines, align nothing."""
        self.flush()
        i = 0
        tab = "\t"
        if rows and rows[0].rstrip().endswith(";"):
            m = re.search(r"tab\s*\((.)\)", rows[0])
            if m:
                tab = m.group(1)
            i = 1
        # format lines end with '.'
        while i < len(rows) and not rows[i].rstrip().endswith("."):
            i += 1
        i += 1
        cells_lines: list[list[str]] = []
        block: list[str] | None = None
        current: list[str] = []
        pending = ""
        for row in rows[i:]:
            if block is not None:
                if row.startswith("T}"):
                    current.append(" ".join(block))
                    block = None
                    rest = row[2:]
                    if rest.startswith(tab):
                        pending = rest[1:]
                        parts = pending.split(tab) if pending else []
                        if pending.endswith("T{"):
                            current.extend(parts[:-1])
                            block = []
                            continue
                        current.extend(parts)
                    cells_lines.append(current)
                    current = []
                else:
                    if row.startswith("."):
                        continue
                    block.append(roff_escapes(row).strip())
                continue
            if row.startswith(".T&"):
                continue
            if row.startswith(".") or row.startswith("'"):
                continue
            if row.strip() in ("_", "=", ""):
                continue
            parts = row.split(tab)
            if parts[-1].strip() == "T{":
                current = [roff_escapes(p).strip() for p in parts[:-1]]
                block = []
                continue
            cells_lines.append([roff_escapes(p).strip() for p in parts])
        rows_out = []
        for cells in cells_lines:
            cells = [c.replace(_JOIN, "").replace(_NBSP, " ") for c in cells]
            cells = ["" if c in ("_", "=", "\\^") else c for c in cells]
            if any(c.strip() for c in cells):
                rows_out.append(cells)
        ncols = max((len(r) for r in rows_out), default=0)
        widths = [
            min(30, max((len(r[k]) for r in rows_out if k < len(r) and k < len(r) - 1), default=0))
            for k in range(ncols)
        ]
        self.drop_hang()
        for cells in rows_out:
            line = "  ".join(
                c if k == len(cells) - 1 else c.ljust(widths[k]) for k, c in enumerate(cells)
            )
            self.emit(line, self.indent())

    def render(self, src: str) -> tuple[str, str]:
        title = ""
        src = src.replace("\\\n", "")
        lines = src.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if line.startswith(('.\\"', "'\\\"")) or line in (".", "'"):
                continue
            if line.startswith((".", "'")) and len(line) > 1:
                body = line[1:].lstrip(" \t")
                m = re.match(r"^(\S+)\s*(.*)$", body)
                if not m:
                    continue
                name, rest = m.group(1), m.group(2)
                if '\\"' in rest:
                    rest = rest[: rest.index('\\"')]
                if name == "TH":
                    args = _roff_args(rest)
                    if args:
                        title = roff_escapes(args[0]) + (
                            f"({roff_escapes(args[1])})" if len(args) > 1 else ""
                        )
                    continue
                if name == "TS":
                    block = []
                    while i < len(lines) and not lines[i].startswith(".TE"):
                        block.append(lines[i])
                        i += 1
                    i += 1
                    self.table(block)
                    continue
                if name == "de":
                    while i < len(lines) and not lines[i].startswith(".."):
                        i += 1
                    i += 1
                    continue
                self.macro(name, _roff_args(rest))
                continue
            text = roff_escapes(line)
            if not self.fill and not line.strip():
                self.flush()
                self.drop_hang()
                self.lines.append("")
                continue
            if self.fill:
                if not line.strip():
                    self.paragraph()
                    continue
                if line[:1] in " \t":
                    self.flush()
                    saved = self.fill
                    self.fill = False
                    self.add_text(text)
                    self.fill = saved
                    continue
            self.add_text(text)
        self.flush()
        out = "\n".join(self.lines).replace(_NBSP, " ")
        return title, out


def render_man(src: str) -> tuple[str, str]:
    title, body = ManRenderer().render(src)
    return title, clean_prose((title + "\n\n" if title else "") + body)
